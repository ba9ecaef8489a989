"""Paged KV cache and the token-packed forward: one ragged batch of N tokens from S sequences per call.

    kv = init_pages(cfg, num_pages, page_size)          # L arrays (pool_layout()); page 0 = the null page
    meta = pack_meta(q_lens, kv_lens, page_tables, ...) # host NumPy -> PagedMeta (where tokens write and attend)
    x, kv = packed_forward(layers, x [N, D], meta, kv, cfg, ffn_fn)

Pages: a pool is one array per layer, keys and values interleaved on the head axis (k head i at 2i, v head i
at 2i + 1), in the layout of the attention backend that reads it (``pool_layout``):
  heads    [P, 2K, ps, hd] (the pure-JAX kernel): a gather of (page, head) pairs lands as [.., K, Cp, ps, hd],
           which is already the batched dots' operand layout [.., K, C, hd]; no per-chunk transpose
  tokens   [P, ps, 2K, hd] (TPU): the layout jax's Pallas ragged paged attention kernel reads
A page id names the same page in every layer (and, for Read-ME, in the router's pool). Page 0 is the null
page: never allocated; padding tokens write there and page-table entries past a sequence's pages point there
(reads of it are masked). Each layer's array is written in place (donated) and never transposed.

Attention (``paged_attention``) reads each sequence's pages through its page table, a chunk of
``chunk_pages`` pages at a time with an online softmax, and only as many chunks as the longest query of its
group needs (a ``while`` loop with a data-dependent trip count): the filled pages, never ``max_model_len``.
Queries come in two groups the host forms (``pack_meta``):
  decode   one query per row, all rows at once (a decode token, or any sequence with one token this step)
  blocks   sequences with several tokens (prefill chunks) cut into blocks of ``block_q`` consecutive tokens,
           one block per loop iteration (their count is data-dependent), so padding costs no compute.
Causal by position (a key is visible when its position <= the query's), GQA (G = H / K query heads per kv
head), optional sliding window. On TPU the same call can go to jax's Pallas ``ragged_paged_attention``
(``attention_backend``).

Dimension names: N packed tokens, S sequences, P pages, ps page size, Mp pages per sequence (page-table width),
Cp pages per chunk, Sd decode rows, NB query blocks, Bq block size, L layers, D model, H query heads,
K kv heads, hd head dim, V vocab.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import FFNFn, project_qkv
from readme_jax.model.layers import rms_norm
from readme_jax.model.rope import rope_sin_cos

NULL_PAGE = 0
_NEG = -1e30
# pages per attention chunk: 4 (64 keys at page size 16) measured fastest on CPU for decode (8 / 32 rows, 192 and
# 512-token contexts: 1.5-1.9x faster than 8 pages, also faster than 1 or 2) and for 32-token query blocks
# (1.05-1.36x): less padding gathered past the filled pages, and the gathered chunk stays in cache
CHUNK_PAGES = 4


def attention_backend() -> str:
    """"pallas_tpu" on TPU (jax's ragged paged attention kernel), else "jax" (``_attend``)."""
    return "pallas_tpu" if jax.default_backend() == "tpu" else "jax"


def pool_layout() -> str:
    """The pool layout of this process's attention backend: "tokens" [P, ps, 2K, hd] for the TPU kernel, else
    "heads" [P, 2K, ps, hd]. Measured on CPU (30 layers of decode attention, SmolLM2's heads, 4-page chunks):
    heads-major 1.27-1.38x faster at 8 and 32 rows over 129- and 400-token contexts, the per-chunk transposes
    of the gathered keys and values gone."""
    return "tokens" if attention_backend() == "pallas_tpu" else "heads"


def init_pages(cfg: LlamaConfig, num_pages: int, page_size: int, dtype=None) -> tuple[jnp.ndarray, ...]:
    """The KV pool of ``cfg``'s decoder: L zero arrays in ``pool_layout()`` (page 0 is the null page)."""
    if num_pages < 2:
        raise ValueError(f"init_pages: num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
    if page_size < 1:
        raise ValueError(f"init_pages: page_size must be >= 1, got {page_size}")
    heads = 2 * cfg.num_kv_heads
    shape = (num_pages, heads, page_size, cfg.head_dim) if pool_layout() == "heads" else \
        (num_pages, page_size, heads, cfg.head_dim)
    return tuple(jnp.zeros(shape, dtype or cfg.compute_dtype) for _ in range(cfg.num_layers))


def page_bytes(cfg: LlamaConfig, page_size: int, dtype=None) -> int:
    """Bytes of one page over all L layers of ``cfg``'s pool."""
    itemsize = jnp.dtype(dtype or cfg.compute_dtype).itemsize
    return cfg.num_layers * page_size * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


@flax.struct.dataclass
class PagedMeta:
    """Where the N packed tokens write their keys/values and which keys each one reads.

    positions   <int32>[N]      each token's position in its sequence (padding: -1)
    write_page  <int32>[N]      page of each token's cache entry (padding: the null page 0)
    write_slot  <int32>[N]      entry within that page
    dec_token   <int32>[Sd]     packed index of each decode row's token (padding: N, out of range)
    dec_pages   <int32>[Sd, Mp] its sequence's page table
    blk_token   <int32>[NB, Bq] packed indices of each block's tokens (padding: N)
    blk_pages   <int32>[NB, Mp] the block's sequence's page table
    num_blocks  <int32>[]       blocks in use (the loop's trip count)
    cu_q_lens   <int32>[S + 1]  first packed token of each sequence; kv_lens <int32>[S];
    page_tables <int32>[S, Mp]; num_seqs <int32>[1]   (the ragged form, for the TPU kernel)
    """

    positions: jnp.ndarray
    write_page: jnp.ndarray
    write_slot: jnp.ndarray
    dec_token: jnp.ndarray
    dec_pages: jnp.ndarray
    blk_token: jnp.ndarray
    blk_pages: jnp.ndarray
    num_blocks: jnp.ndarray
    cu_q_lens: jnp.ndarray
    kv_lens: jnp.ndarray
    page_tables: jnp.ndarray
    num_seqs: jnp.ndarray


def pack_meta(q_lens, kv_lens, page_tables, *, page_size: int, num_tokens: int, num_decode: int,
              num_blocks: int, block_q: int, num_seqs: int | None = None) -> PagedMeta:
    """The device metadata of one step, built on the host.

    q_lens / kv_lens <int>[S] (tokens this step; length in cache after it), page_tables <int>[S, Mp] (0 = none).
    Sequence s's tokens are packed contiguously in order and sit at positions kv_len - q_len .. kv_len - 1.
    Static sizes (the caller's buckets): num_tokens N >= sum(q_lens), num_decode Sd (rows of the decode
    group), num_blocks NB (block capacity), block_q Bq, num_seqs >= S (default S; the ragged form's rows).
    Sequences with q_len == 1 go to the decode group, the others to blocks. Raises ValueError when a bucket is
    too small or a page table does not cover a sequence's kv_len.
    """
    q_lens, kv_lens = np.asarray(q_lens, np.int64), np.asarray(kv_lens, np.int64)
    tables = np.asarray(page_tables, np.int32)
    S = len(q_lens)
    if tables.ndim != 2 or tables.shape[0] != S or kv_lens.shape != (S,):
        raise ValueError(f"pack_meta: q_lens [{S}], kv_lens {kv_lens.shape} and page_tables {tables.shape} "
                         "must agree on S")
    n = int(q_lens.sum())
    if n > num_tokens:
        raise ValueError(f"pack_meta: {n} tokens exceed the token bucket {num_tokens}")
    if (q_lens < 1).any() or (kv_lens < q_lens).any():
        raise ValueError("pack_meta: every sequence needs q_len >= 1 and kv_len >= q_len")
    if ((kv_lens + page_size - 1) // page_size > tables.shape[1]).any():
        raise ValueError(f"pack_meta: a kv_len needs more than the page table's {tables.shape[1]} pages")
    seq = np.repeat(np.arange(S), q_lens)
    start = np.cumsum(q_lens) - q_lens
    pos = (kv_lens - q_lens)[seq] + (np.arange(n) - start[seq])
    if (tables[seq, pos // page_size] == NULL_PAGE).any():
        raise ValueError("pack_meta: a token's position falls on the null page (page-table entry 0)")
    positions = np.full(num_tokens, -1, np.int32)
    positions[:n] = pos
    write_page = np.zeros(num_tokens, np.int32)
    write_page[:n] = tables[seq, pos // page_size]
    write_slot = np.zeros(num_tokens, np.int32)
    write_slot[:n] = pos % page_size
    Mp = tables.shape[1]
    dec = np.flatnonzero(q_lens == 1)
    if len(dec) > num_decode:
        raise ValueError(f"pack_meta: {len(dec)} decode rows exceed the bucket {num_decode}")
    dec_token = np.full(num_decode, num_tokens, np.int32)
    dec_token[:len(dec)] = start[dec]
    dec_pages = np.zeros((num_decode, Mp), np.int32)
    dec_pages[:len(dec)] = tables[dec]
    blocks = [(s, b) for s in np.flatnonzero(q_lens > 1) for b in range(0, int(q_lens[s]), block_q)]
    if len(blocks) > num_blocks:
        raise ValueError(f"pack_meta: {len(blocks)} query blocks exceed the capacity {num_blocks}")
    blk_token = np.full((num_blocks, block_q), num_tokens, np.int32)
    blk_pages = np.zeros((num_blocks, Mp), np.int32)
    for i, (s, b) in enumerate(blocks):
        m = min(block_q, int(q_lens[s]) - b)
        blk_token[i, :m] = start[s] + b + np.arange(m)
        blk_pages[i] = tables[s]
    S_pad = S if num_seqs is None else num_seqs
    if S_pad < S:
        raise ValueError(f"pack_meta: {S} sequences exceed the bucket {S_pad}")
    cu = np.full(S_pad + 1, n, np.int32)
    cu[:S + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    ragged_kv = np.zeros(S_pad, np.int32)
    ragged_kv[:S] = kv_lens
    ragged_tables = np.zeros((S_pad, Mp), np.int32)
    ragged_tables[:S] = tables
    return PagedMeta(positions=positions, write_page=write_page, write_slot=write_slot, dec_token=dec_token,
                     dec_pages=dec_pages, blk_token=blk_token, blk_pages=blk_pages,
                     num_blocks=np.int32(len(blocks)),
                     cu_q_lens=cu, kv_lens=ragged_kv, page_tables=ragged_tables,
                     num_seqs=np.array([S], np.int32))


def write_kv(kv: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, meta: PagedMeta) -> jnp.ndarray:
    """One layer's pool kv (``pool_layout()``) with the N new tokens' k, v [N, K, hd] written at their
    (write_page, write_slot) (padding into the null page). Only the new entries are written."""
    N, K, hd = k.shape
    new = jnp.stack([k, v], axis=2).reshape(N, 2 * K, hd).astype(kv.dtype)      # k at 2i, v at 2i + 1
    if pool_layout() == "heads":
        return kv.at[meta.write_page, :, meta.write_slot].set(new)
    return kv.at[meta.write_page, meta.write_slot].set(new)


def _attend(q, q_pos, pages, kv, *, chunk_pages: int, sliding_window: int | None):
    """Chunked online-softmax attention over paged keys.

    q [B, T, H, hd]; q_pos <int32>[B, T] (-1: padding, sees nothing); pages <int32>[B, Mp]; kv one layer's
    heads-major pool [P, 2K, ps, hd] -> [B, T, H, hd]. Reads ceil((max q_pos + 1) / (Cp ps)) chunks of every
    row's table; each chunk's keys and values are gathered by (page, head) straight into [B, K, C, hd]."""
    B, T, H, hd = q.shape
    K2, ps = kv.shape[1], kv.shape[2]
    K = K2 // 2
    G = H // K
    Mp = pages.shape[1]
    Cp = min(chunk_pages, Mp)
    if Mp % Cp:
        pages = jnp.pad(pages, ((0, 0), (0, Cp - Mp % Cp)))
    C = Cp * ps
    qh = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)                        # [B, K, G, T, hd]
    n_chunks = (jnp.max(q_pos) + C) // C
    k_heads = (2 * jnp.arange(K, dtype=jnp.int32))[None, :, None]                  # [1, K, 1]: k at 2i, v at 2i + 1

    def body(c, carry):
        m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(pages, c * Cp, Cp, axis=1)[:, None]    # [B, 1, Cp]
        k = kv[ids, k_heads].reshape(B, K, C, hd)                                  # [B, K, Cp, ps, hd] -> [B, K, C, hd]
        v = kv[ids, k_heads + 1].reshape(B, K, C, hd)
        s = jnp.einsum("bkgtd,bkcd->bkgtc", qh, k).astype(jnp.float32) * (hd ** -0.5)
        k_pos = c * C + jnp.arange(C, dtype=jnp.int32)
        ok = k_pos[None, None, :] <= q_pos[:, :, None]                            # [B, T, C]
        if sliding_window is not None:
            ok &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
        ok = ok[:, None, None]
        s = jnp.where(ok, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(v.dtype), v).astype(jnp.float32)
        return m_new, l, acc

    init = (jnp.full((B, K, G, T), _NEG, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def paged_attention(q: jnp.ndarray, kv: jnp.ndarray, meta: PagedMeta, *, chunk_pages: int = CHUNK_PAGES,
                    sliding_window: int | None = None) -> jnp.ndarray:
    """Ragged paged attention of the N packed queries q [N, H, hd] over one layer's pool kv (``pool_layout()``,
    already holding this step's keys/values) -> [N, H, hd] (padding rows 0). Pure JAX (see module doc), or
    the TPU kernel."""
    N, H, hd = q.shape
    if attention_backend() == "pallas_tpu":
        # TPU-only module, imported where it runs
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
        return ragged_paged_attention(q, kv, meta.kv_lens, meta.page_tables, meta.cu_q_lens, meta.num_seqs,
                                      sm_scale=hd ** -0.5, sliding_window=sliding_window)
    pos = jnp.concatenate([meta.positions, jnp.full((1,), -1, jnp.int32)])        # index N = padding
    qp = jnp.concatenate([q, jnp.zeros((1, H, hd), q.dtype)])
    out = jnp.zeros((N + 1, H, hd), q.dtype)
    attend = lambda qq, qpos, pages: _attend(qq, qpos, pages, kv, chunk_pages=chunk_pages,
                                             sliding_window=sliding_window)
    if meta.dec_token.shape[0]:
        d = meta.dec_token
        out = out.at[d].set(attend(qp[d][:, None], pos[d][:, None], meta.dec_pages)[:, 0])
    if meta.blk_token.shape[0]:
        def block(i, out):
            t = meta.blk_token[i]                                                   # [Bq]
            y = attend(qp[t][None], pos[t][None], meta.blk_pages[i][None])[0]
            return out.at[t].set(y)
        out = jax.lax.fori_loop(0, meta.num_blocks, block, out)
    return out[:N]


def packed_forward(layers: tuple[dict, ...], x: jnp.ndarray, meta: PagedMeta, kv: tuple[jnp.ndarray, ...],
                   cfg: LlamaConfig, ffn_fn: FFNFn, *, chunk_pages: int = CHUNK_PAGES):
    """The decoder stack over N packed tokens: x [N, D] embedded tokens, ``layers`` the per-layer weight
    dicts (``decoder.unstack_layers``), ``kv`` the pool (L arrays, ``pool_layout()``), ``ffn_fn(p, h [N, D])
    -> (y [N, D], aux)``. Each layer writes its new keys/values into its pool array, then attends.
    Returns (x [N, D] before the final norm, kv)."""
    N = x.shape[0]
    dt = x.dtype
    sin, cos = rope_sin_cos(jnp.maximum(meta.positions, 0), cfg)                  # [N, hd/2]
    kv = list(kv)
    for i, p in enumerate(layers):
        q, k, v = project_qkv(p, x, sin, cos, cfg)
        kv[i] = write_kv(kv[i], k, v, meta)
        att = paged_attention(q, kv[i], meta, chunk_pages=chunk_pages, sliding_window=cfg.sliding_window)
        x = x + att.reshape(N, -1) @ p["wo"].astype(dt)
        y, _ = ffn_fn(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))
        x = x + y
    return x, tuple(kv)
