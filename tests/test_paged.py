"""Paged KV pools and the token-packed forward: equal to contiguous attention and to each sequence run alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from readme_jax.model import dispatch
from readme_jax.model.config import LlamaConfig
from readme_jax.model.layers import gqa_attention
from readme_jax.model.llama import Llama
from readme_jax.model.packed import backbone_packed, head_rows, packed_layers, route_packed, router_layers
from readme_jax.model.paged import init_pages, pack_meta, paged_attention, pool_layout, write_kv
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import RouterConfig
from tests.tiny_models import random_model

CFG = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=128)
RCFG = ReadMeConfig(base=CFG, num_experts=3, expert_dim=16,
                    router=RouterConfig(vocab_size=48, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=4,
                                        max_len=128))
PS, P, MP = 4, 40, 8                      # page size, pool pages, page-table width


def tables_for(kv_lens, rng):
    """Disjoint shuffled pages (ids >= 1) covering each kv_len; the rest of each row 0."""
    free = list(rng.permutation(np.arange(1, P)))
    t = np.zeros((len(kv_lens), MP), np.int32)
    for s, n in enumerate(kv_lens):
        for j in range(-(-n // PS)):
            t[s, j] = free.pop()
    return t


def meta_for(q_lens, kv_lens, tables, N=None, **kw):
    return pack_meta(q_lens, kv_lens, tables, page_size=PS, num_tokens=N or int(sum(q_lens)) + 3,
                     num_decode=kw.pop("num_decode", 4), num_blocks=kw.pop("num_blocks", 8),
                     block_q=kw.pop("block_q", 4), **kw)


def in_pool_layout(kv):
    """A pool built tokens-major [P, ps, 2K, hd] (the TPU kernel's layout) in this backend's ``pool_layout()``."""
    return jnp.transpose(kv, (0, 2, 1, 3)) if pool_layout() == "heads" else jnp.asarray(kv)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_equals_contiguous(window):
    """Ragged batch (decode rows, prefill chunks, a chunk continuing a cached prefix): every query row equals
    gqa_attention over its sequence's contiguous keys, causal by position."""
    rng = np.random.default_rng(0)
    H, K, hd = 4, 2, 8
    q_lens, kv_lens = [1, 7, 1, 5, 10], [9, 7, 1, 13, 10]
    tables = tables_for(kv_lens, rng)
    meta = meta_for(q_lens, kv_lens, tables)
    N = meta.positions.shape[0]
    kv = np.zeros((P, PS, 2 * K, hd), np.float32)
    ks = [rng.standard_normal((n, K, hd)).astype(np.float32) for n in kv_lens]
    vs = [rng.standard_normal((n, K, hd)).astype(np.float32) for n in kv_lens]
    for s, n in enumerate(kv_lens):             # earlier steps' entries, then this step's through write_kv
        for t in range(n - q_lens[s]):
            p, o = tables[s, t // PS], t % PS
            kv[p, o, 0::2], kv[p, o, 1::2] = ks[s][t], vs[s][t]
    k_new = np.zeros((N, K, hd), np.float32)
    v_new = np.zeros((N, K, hd), np.float32)
    rows = np.concatenate([np.arange(n - q, n) for q, n in zip(q_lens, kv_lens)])
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    k_new[:len(rows)] = [ks[s][t] for s, t in zip(seq, rows)]
    v_new[:len(rows)] = [vs[s][t] for s, t in zip(seq, rows)]
    q = rng.standard_normal((N, H, hd)).astype(np.float32)
    out = jax.jit(lambda q, kv, k, v, m: paged_attention(q, write_kv(kv, k, v, m), m, chunk_pages=2,
                                                         sliding_window=window))(q, in_pool_layout(kv), k_new,
                                                                                 v_new, meta)
    start = np.cumsum(q_lens) - q_lens
    for s, (ql, n) in enumerate(zip(q_lens, kv_lens)):
        qpos = np.arange(n - ql, n)
        mask = (np.arange(n)[None] <= qpos[:, None])
        if window is not None:
            mask &= qpos[:, None] - np.arange(n)[None] < window
        want = gqa_attention(q[None, start[s]:start[s] + ql], ks[s][None], vs[s][None], mask[None])[0]
        chex.assert_trees_all_close(out[start[s]:start[s] + ql], want, atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[int(sum(q_lens)):]).any()                          # padding rows stay 0


def test_pool_layout_is_the_tpu_kernels():
    """The ragged metadata are what jax's TPU ragged paged attention reads, and the tokens-major pool is its
    layout: its pure-JAX reference over the pool equals our attention over the same pool in this backend's
    layout (on TPU the very same arrays, so the TPU seam passes them as they are)."""
    rng = np.random.default_rng(1)
    q_lens, kv_lens = [3, 1, 6], [3, 8, 11]
    tables = tables_for(kv_lens, rng)
    meta = meta_for(q_lens, kv_lens, tables, N=10)
    kv = jnp.asarray(rng.standard_normal((P, PS, 4, 8)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((10, 4, 8)), jnp.float32)
    ours = jax.jit(paged_attention)(q, in_pool_layout(kv), meta)
    ref = ref_ragged_paged_attention(q, kv, meta.kv_lens, meta.page_tables, meta.cu_q_lens, meta.num_seqs,
                                     sm_scale=8 ** -0.5)
    chex.assert_trees_all_close(ours[:10], ref[:10], atol=1e-5, rtol=1e-5)


def test_pack_meta_rejects_bad_input():
    t = np.array([[1, 2, 0]], np.int32)
    with pytest.raises(ValueError, match="token bucket"):
        pack_meta([9], [9], t, page_size=4, num_tokens=8, num_decode=1, num_blocks=4, block_q=4)
    with pytest.raises(ValueError, match="page table"):
        pack_meta([1], [13], t, page_size=4, num_tokens=8, num_decode=1, num_blocks=4, block_q=4)
    with pytest.raises(ValueError, match="null page"):
        pack_meta([1], [9], np.array([[1, 0, 0]]), page_size=4, num_tokens=8, num_decode=1, num_blocks=4,
                  block_q=4)
    with pytest.raises(ValueError, match="query blocks"):
        pack_meta([6], [6], t, page_size=4, num_tokens=8, num_decode=1, num_blocks=1, block_q=4)


def run_steps(model, seqs, schedule, experts=None, dispatcher=None):
    """Run packed steps: schedule = list of steps, each {seq: n tokens}. Returns {seq: logits rows} of
    every token run (all positions, to compare with the model's full-sequence call)."""
    rng = np.random.default_rng(2)
    total = {s: len(t) for s, t in seqs.items()}
    tables = dict(zip(seqs, tables_for([total[s] for s in seqs], rng)))
    kv = init_pages(CFG, P, PS)
    done = {s: 0 for s in seqs}
    layers = packed_layers(model, dispatcher)
    got = {s: [] for s in seqs}
    fwd = jax.jit(lambda layers, toks, ex, meta, kv: _fwd(model, layers, toks, ex, meta, kv, dispatcher))
    for step in schedule:
        order = list(step)
        q_lens = [step[s] for s in order]
        kv_lens = [done[s] + step[s] for s in order]
        meta = meta_for(q_lens, kv_lens, np.stack([tables[s] for s in order]), N=24)
        toks = np.zeros(24, np.int32)
        ex = np.full(24, -1, np.int32)
        flat = np.concatenate([seqs[s][done[s]:done[s] + step[s]] for s in order])
        toks[:len(flat)] = flat
        if experts is not None:
            ex[:len(flat)] = np.concatenate([experts[s][done[s]:done[s] + step[s]] for s in order])
        logits, kv = fwd(layers, toks, ex, meta, kv)
        o = 0
        for s in order:
            got[s].append(np.asarray(logits[o:o + step[s]]))
            o += step[s]
            done[s] += step[s]
    return {s: np.concatenate(v) for s, v in got.items()}


def _fwd(model, layers, toks, ex, meta, kv, dispatcher):
    routed = dispatcher is not None
    x, kv = backbone_packed(model, layers, toks, meta, kv, experts=ex if routed else None, dispatcher=dispatcher)
    return head_rows(model, x), kv


def full_logits(model, seqs, lengths, experts=None):
    """The model's own call on every sequence at once (left-padded: positions count real tokens), jitted:
    {seq: logits [n, V]} of its first lengths[seq] tokens."""
    T = max(lengths.values())
    ids = np.zeros((len(seqs), T), np.int32)
    ex = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), bool)
    for r, s in enumerate(seqs):
        n = lengths[s]
        ids[r, T - n:], mask[r, T - n:] = seqs[s][:n], True
        if experts is not None:
            ex[r, T - n:] = experts[s][:n]
    if experts is None:
        out = jax.jit(lambda i, m: model(i, attention_mask=m))(ids, mask)
    else:
        out = jax.jit(lambda i, m, e: model(i, attention_mask=m, expert_ids=e))(ids, mask, ex)
    return {s: np.asarray(out[r, T - lengths[s]:]) for r, s in enumerate(seqs)}


SEQS = {"a": 20, "b": 6, "c": 11}
SCHEDULE = [{"a": 7, "b": 4}, {"a": 5, "b": 1, "c": 9}, {"a": 8, "b": 1, "c": 1}, {"c": 1}]


def test_packed_steps_equal_each_sequence_alone_dense():
    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=3, std=0.3)
    rng = np.random.default_rng(3)
    seqs = {s: rng.integers(0, 48, n).astype(np.int32) for s, n in SEQS.items()}
    got = run_steps(model, seqs, SCHEDULE)
    want = full_logits(model, seqs, {s: len(g) for s, g in got.items()})
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_steps_equal_each_sequence_alone_readme():
    """Read-ME with oracle experts per token (the packed call never routes)."""
    model = random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=4, std=0.3)
    rng = np.random.default_rng(4)
    seqs = {s: rng.integers(0, 48, n).astype(np.int32) for s, n in SEQS.items()}
    experts = {s: rng.integers(0, 3, n).astype(np.int32) for s, n in SEQS.items()}
    got = run_steps(model, seqs, SCHEDULE, experts, dispatch.get("blocked"))
    want = full_logits(model, seqs, {s: len(g) for s, g in got.items()}, experts)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_route_packed_equals_router():
    model = random_model(lambda rngs: ReadMe(RCFG, rngs=rngs), seed=5, std=0.3, overrides={"router.head": 1.0})
    rng = np.random.default_rng(5)
    q_lens, kv_lens = [5, 1, 7], [5, 1, 7]
    seqs = [rng.integers(0, 48, n).astype(np.int32) for n in q_lens]
    tables = tables_for(kv_lens, rng)
    meta = meta_for(q_lens, kv_lens, tables, N=16)
    toks = np.zeros(16, np.int32)
    toks[:13] = np.concatenate(seqs)
    rkv = init_pages(RCFG.router.trunk_config(), P, PS)
    ids, rkv = jax.jit(lambda t, m, kv: route_packed(model.router, router_layers(model.router), t, m, kv))(
        toks, meta, rkv)
    T = max(q_lens)
    padded = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    for r, s in enumerate(seqs):
        padded[r, T - len(s):], mask[r, T - len(s):] = s, True
    full = np.asarray(jax.jit(lambda i, m: model.route(i, attention_mask=m))(padded, mask))
    want = np.concatenate([full[r, T - len(s):] for r, s in enumerate(seqs)])
    np.testing.assert_array_equal(np.asarray(ids[:13]), want)
    assert len(set(want.tolist())) > 1
