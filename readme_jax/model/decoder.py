"""The decoder stack as pure functions over stacked layer parameters, shared by the dense and MoE models.

Layer parameters are stacked along a leading L axis so the stack can run under ``lax.scan``:
  attn_norm [L, D], wq [L, D, H*hd], wk/wv [L, D, K*hd], wo [L, H*hd, D], mlp_norm [L, D],
  and the FFN's own weights (dense: w_gate/w_up [L, D, F], w_down [L, F, D]).
The FFN is a callable ``ffn_fn(layer_params, h[B, T, D]) -> (y[B, T, D], aux)`` so the same stack serves the
dense model, the MoE model (routing precomputed once, closed over) and the statistics passes (aux = what
they accumulate per layer; stacked to [L, ...] on the way out).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from readme_jax.model.config import LlamaConfig
from readme_jax.model.causal_attention import causal_attention
from readme_jax.model.layers import OutMajor, attention_mask, gqa_attention, rms_norm, swiglu, swiglu_hidden
from readme_jax.model.rope import apply_rope, rope_sin_cos

FFNFn = Callable[[dict, jnp.ndarray], tuple[jnp.ndarray, Any]]
PROJECTIONS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})   # a layer's [D_in, D_out] matmuls


@flax.struct.dataclass
class KVCache:
    """Key/value cache with one write index per row ("slot"), for batched prefill, incremental decode and
    continuous batching (each slot fills, is freed and reused independently of the others).

    k, v      [L, B, S, K, hd]  keys (already rotated) and values, S = max_len cache slots per row
    key_mask  <bool>[B, S]      which cache slots hold real tokens
    index     <int32>[B]        each row's next cache slot to write
    next_pos  <int32>[B]        RoPE position of each row's next token

    A call with new tokens x [B, T] and attention mask m [B, T] writes row b's T entries at
    index[b] .. index[b] + T - 1 (padding entries with key_mask False) and advances index[b] past its last
    real token: left-padded prompts (``generation``) advance by T, right-padded chunks (serving) by their
    real length, a row with no real token (an idle serving slot) not at all. Writes past S are dropped.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    key_mask: jnp.ndarray
    index: jnp.ndarray
    next_pos: jnp.ndarray

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   key_mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def _write_rows(buf: jnp.ndarray, new: jnp.ndarray, index: jnp.ndarray, layer: int | None = None) -> jnp.ndarray:
    """buf [B, S, ...] (or [L, B, S, ...] with ``layer``), new [B, T, ...], index <int32>[B] -> buf with
    buf[(layer,) b, index[b] + t] = new[b, t] (entries past S dropped): only the new entries are written."""
    B, T = new.shape[:2]
    cols = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    rows = jnp.arange(B)[:, None]
    if layer is not None:
        return buf.at[layer, rows, cols].set(new.astype(buf.dtype), mode="drop")
    return buf.at[rows, cols].set(new.astype(buf.dtype), mode="drop")


def dense_ffn_with_aux(aux_fn: Callable[[dict, jnp.ndarray], Any]) -> FFNFn:
    """The dense SwiGLU FFN whose aux is ``aux_fn(layer_params, act)``, act [B, T, F] = SiLU(h W_gate) *
    (h W_up), the down_proj input (statistics and routing targets reduce it in the layer that makes it).
    Returns ``ffn(layer_params, h [B, T, D]) -> (y [B, T, D], aux)``."""
    def ffn(p: dict, h: jnp.ndarray):
        dt = h.dtype
        act = swiglu_hidden(h, p["w_gate"].astype(dt), p["w_up"].astype(dt))
        return act @ p["w_down"].astype(dt), aux_fn(p, act)
    return ffn


def dense_ffn(p: dict, h: jnp.ndarray) -> tuple[jnp.ndarray, None]:
    """The dense SwiGLU FFN: h [B, T, D] -> ([B, T, D], None); w_gate/w_up [D, F], w_down [F, D] (or
    out-major, ``layers.swiglu``)."""
    dt = h.dtype
    return swiglu(h, *(p[k].astype(dt) for k in ("w_gate", "w_up", "w_down"))), None


def positions_from_mask(attention_mask_: jnp.ndarray, start: jnp.ndarray | None = None) -> jnp.ndarray:
    """RoPE positions of left-padded rows: <int32>[B, T] counting real tokens from ``start`` [B] (default 0)."""
    pos = jnp.cumsum(attention_mask_.astype(jnp.int32), axis=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


def project_qkv(p: dict, x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray, cfg: LlamaConfig):
    """The attention inputs of one layer: pre-norm, q/k/v projections, RoPE on q and k.
    x [..., D] (any leading dims, e.g. [B, T] or a packed [N]); sin/cos [..., hd/2] ->
    (q [..., H, hd], k [..., K, hd], v [..., K, hd]) in x's dtype. Every attention path (contiguous and
    paged caches, training and serving) projects with this one function; an architecture's variants
    (projection biases, qk-norm) belong here: ``cfg.qkv_bias`` adds bq [H*hd], bk/bv [K*hd] (Qwen2)."""
    dt = x.dtype
    lead = x.shape[:-1]
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)

    def project(w: str, bias: str, heads: int) -> jnp.ndarray:
        y = h @ p[w].astype(dt)
        if cfg.qkv_bias:
            y = y + p[bias].astype(dt)
        return y.reshape(*lead, heads, cfg.head_dim)

    q, k = project("wq", "bq", cfg.num_heads), project("wk", "bk", cfg.num_kv_heads)
    v = project("wv", "bv", cfg.num_kv_heads)
    return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v


def _attention_block(p, x, sin, cos, attend, kv, index, cfg, layer=None):
    """Pre-norm attention with residual. x [B, T, D]; sin/cos [B, T, hd/2];
    attend(q [B, T, H, hd], k/v [B, S, K, hd]) -> [B, T, H, hd] the attention proper (masks inside);
    kv: None or this layer's cache (k, v) [B, S, K, hd] (or, with ``layer``, the whole stack's [L, B, S, K, hd],
    written in place at that layer), written at index <int32>[B] -> (x [B, T, D], kv)."""
    B, T, _ = x.shape
    dt = x.dtype
    q, k, v = project_qkv(p, x, sin, cos, cfg)
    if kv is not None:
        ck, cv = kv
        kv = (_write_rows(ck, k, index, layer), _write_rows(cv, v, index, layer))
        k, v = (c if layer is None else c[layer] for c in kv)
        k, v = k.astype(dt), v.astype(dt)
    out = attend(q, k, v).reshape(B, T, cfg.num_heads * cfg.head_dim)
    return x + out @ p["wo"].astype(dt), kv


_REMAT_POLICY = {          # model/config.py REMAT_POLICIES -> what jax.checkpoint keeps
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def unstack_layers(layers: dict) -> tuple[dict, ...]:
    """Stacked [L, ...] layer params -> a tuple of L per-layer dicts.

    Decode loops split the weights once, before the loop: a ``lax.scan`` over stacked weights slices (and
    on CPU copies) every layer's weights at every step, which costs as much memory traffic as the weights
    themselves (measured 1.6x slower decode at B=1 and B=8 on SmolLM2, benchmarks/dense.py). The 2-D
    projections (``PROJECTIONS``) come out-major (``layers.OutMajor``: ``x @ w`` unchanged, XLA CPU's dot
    faster at decode row counts); other entries (norms, biases, experts' [E, ...] weights, tied expert tables
    that a call gathers) as they are."""
    n = jax.tree.leaves(layers)[0].shape[0]
    wrap = lambda k, v: k in PROJECTIONS and v.ndim == 3 and "channels" not in layers
    return tuple({k: OutMajor.of(v[i]) if wrap(k, v) else v[i] for k, v in layers.items()} for i in range(n))


def run_layers(layers: dict | tuple[dict, ...], x: jnp.ndarray, *, positions: jnp.ndarray,
               attention_mask_: jnp.ndarray, cfg: LlamaConfig, ffn_fn: FFNFn = dense_ffn,
               cache: KVCache | None = None):
    """Run the L decoder layers.

    layers: stacked params (see module doc), or the per-layer tuple of ``unstack_layers`` (then the layers
    run as an unrolled loop); x [B, T, D] embedded tokens in the compute dtype;
    positions <int32>[B, T]; attention_mask_ <bool>[B, T] (False = padding).
    Returns (x [B, T, D], cache or None, aux stacked [L, ...] or None).
    """
    T = x.shape[1]
    sin, cos = rope_sin_cos(positions, cfg)
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_mask = None      # whole sequences attend to themselves: query blocks, masked blocks skipped
        attend = lambda q, k, v: causal_attention(q, k, v, attention_mask_, cfg.sliding_window)
    else:
        index = cache.index
        key_mask = _write_rows(cache.key_mask, attention_mask_, index)
        mask = attention_mask(index[:, None] + jnp.arange(T)[None, :], key_mask, cfg.sliding_window)
        attend = lambda q, k, v: gqa_attention(q, k, v, mask)

    def layer(x, p, kv, i=None):
        x, kv = _attention_block(p, x, sin, cos, attend, kv, index, cfg, i)
        x = checkpoint_name(x, "attention_out")
        y, aux = ffn_fn(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))
        return x + y, kv, aux

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, prevent_cse=False, policy=_REMAT_POLICY[cfg.remat])

    kvs = None if cache is None else (cache.k, cache.v)
    if isinstance(layers, dict) and cfg.scan_layers:
        def body(x, xs):
            p, kv = xs
            x, kv, aux = layer(x, p, kv)
            return x, (kv, aux)
        x, (kvs, aux) = jax.lax.scan(body, x, (layers, kvs))
    else:
        auxs = []                     # the stacked cache is threaded through: each layer writes its new
        for i in range(cfg.num_layers):  # entries in place (no per-layer slice copies, no re-stacking)
            p = layers[i] if isinstance(layers, tuple) else jax.tree.map(lambda a: a[i], layers)
            x, kvs, aux = layer(x, p, kvs, None if kvs is None else i)
            auxs.append(aux)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxs) if auxs else None
    if cache is not None:
        n_new = jnp.sum(attention_mask_, axis=1, dtype=jnp.int32)
        past_last = jnp.max(attention_mask_ * jnp.arange(1, T + 1, dtype=jnp.int32)[None, :], axis=1)
        cache = cache.replace(k=kvs[0], v=kvs[1], key_mask=key_mask, index=index + past_last,
                              next_pos=cache.next_pos + n_new)
    return x, cache, aux
