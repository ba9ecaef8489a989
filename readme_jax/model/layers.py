"""Pure functions for the pieces of a Llama block: RMSNorm, grouped-query attention, SwiGLU; projection
weights held out-major for decode loops.

Dimension letters: B batch, T query time, S key time (cache slots), D model, F ffn, H query heads,
K kv heads, G = H / K query heads per kv head, hd head dim; M rows, I / O a projection's in / out features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

OUT_MAJOR_MAX_OUTPUT = 1 << 21   # rows x out features up to which CPU computes (w_t x^T)^T (see matmul_out_major)


def matmul_out_major(x: jnp.ndarray, w_t: jnp.ndarray) -> jnp.ndarray:
    """x [..., I] times a weight held out-major, w_t [O, I] (torch's layout) -> [..., O] (= x @ w_t.T).

    On CPU, from 2 rows while the product has at most ``OUT_MAJOR_MAX_OUTPUT`` elements, as (w_t x^T)^T with
    both transposes pinned by optimization barriers (without them XLA folds the transposes into the dot and
    picks its slower form): XLA CPU's dot then streams the weight faster at the row counts of decode and
    prefill chunks (SmolLM2's 576 x 1536 FFN projections: 1.35x at 8 rows, 1.24x at 32, 1.1x at 128-256;
    the tied [576, 49152] head 1.4-1.5x at 8-32 rows; at 64+ head rows the [O, M] transpose costs more than
    it saves; at 1 row the plain form is as fast, and 1.15x faster for the head). Elsewhere (GPU / TPU, 1
    row, larger products) the plain ``x @ w_t.T``."""
    if not _transposed_form(x, w_t.shape[0]):
        return x @ w_t.T
    y = jax.lax.optimization_barrier(w_t @ _rows_transposed(x))                                # [O, M]
    return y.T.reshape(*x.shape[:-1], w_t.shape[0])


def _transposed_form(x: jnp.ndarray, out_features: int) -> bool:
    """Whether ``matmul_out_major`` computes x [..., I] times an [O, I] weight as (w_t x^T)^T."""
    m = math.prod(x.shape[:-1])
    return jax.default_backend() == "cpu" and 1 < m and m * out_features <= OUT_MAJOR_MAX_OUTPUT


def _rows_transposed(x: jnp.ndarray) -> jnp.ndarray:
    """x [..., I] -> x^T [I, M], pinned (an optimization barrier keeps XLA from folding it into the dot)."""
    return jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)


def swiglu(x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
    """The SwiGLU FFN, SiLU(x W_gate) * (x W_up) W_down: x [..., D], w_gate / w_up [D, F], w_down [F, D]
    (arrays, or ``OutMajor`` weights of those logical shapes) -> [..., D]. All three out-major, where
    ``matmul_out_major`` takes its transposed form, the whole FFN runs transposed ([F, M] in between): x and
    the output are transposed once each instead of around every projection (6 transposes -> 2)."""
    if all(isinstance(w, OutMajor) for w in (w_gate, w_up, w_down)) and _transposed_form(x, w_gate.t.shape[0]):
        xt = _rows_transposed(x)                                                           # [D, M]
        act = jax.nn.silu(w_gate.t @ xt) * (w_up.t @ xt)                                   # [F, M]
        y = jax.lax.optimization_barrier(w_down.t @ act)                                   # [D, M]
        return y.T.reshape(x.shape)
    return swiglu_hidden(x, w_gate, w_up) @ w_down


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutMajor:
    """A projection weight [I, O] held transposed, ``t`` [O, I], so ``x @ w`` runs ``matmul_out_major``
    (decode loops hold their 2-D projections this way: ``decoder.unstack_layers``). ``shape`` / ``dtype``
    describe the logical [I, O] weight."""
    t: jax.Array

    @classmethod
    def of(cls, w: jnp.ndarray) -> OutMajor:
        """An in-major [I, O] weight -> OutMajor (one transposed copy, made once before the loop)."""
        return cls(jnp.transpose(w))

    @property
    def shape(self) -> tuple[int, int]:
        return self.t.shape[::-1]

    @property
    def dtype(self):
        return self.t.dtype

    @property
    def size(self) -> int:
        return self.t.size

    @property
    def nbytes(self) -> int:
        return self.t.nbytes

    def astype(self, dtype) -> OutMajor:
        return OutMajor(self.t.astype(dtype))

    def __rmatmul__(self, x: jnp.ndarray) -> jnp.ndarray:
        return matmul_out_major(x, self.t)


def masked_swiglu(x: jnp.ndarray, w_gate: OutMajor, w_up: OutMajor, w_down: OutMajor,
                  mask: jnp.ndarray) -> jnp.ndarray:
    """The SwiGLU FFN with each row's intermediate channels masked: x [M, D], out-major w_gate / w_up (logical
    [D, F]) and w_down ([F, D]), mask [F, M] (the multiplier of row m's channel f) -> [M, D]. On CPU from 2
    rows it runs transposed as ``swiglu`` does, so the mask is taken in its [F, M] layout (a row-major [M, F]
    mask transposed into it made the FFN ~3x slower at 8 rows: 67 vs 22 ms for 30 SmolLM2 layers)."""
    if not _transposed_form(x, w_gate.t.shape[0]):
        return (swiglu_hidden(x, w_gate, w_up) * mask.T) @ w_down
    xt = _rows_transposed(x)                                                                   # [D, M]
    act = jax.nn.silu(w_gate.t @ xt) * (w_up.t @ xt) * mask                                   # [F, M]
    return jax.lax.optimization_barrier(w_down.t @ act).T                                     # [D, M] -> [M, D]


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x [..., D] * scale [D] / rms(x), computed in float32 and cast back to x's dtype (as HF)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def attention_mask(q_slots: jnp.ndarray, key_mask: jnp.ndarray, sliding_window: int | None) -> jnp.ndarray:
    """Which keys each query may see: <bool>[B, T, S].

    q_slots <int32>[B, T] (or [T], the same for every row): the cache slot of each query;
    key_mask <bool>[B, S]: which key slots hold real tokens. Causal in slot order; keys of padding are hidden.
    """
    q_slots = jnp.broadcast_to(q_slots, (key_mask.shape[0],) + q_slots.shape[-1:])
    k_slots = jnp.arange(key_mask.shape[1])
    allowed = k_slots[None, None, :] <= q_slots[:, :, None]
    if sliding_window is not None:
        allowed &= q_slots[:, :, None] - k_slots[None, None, :] < sliding_window
    return allowed & key_mask[:, None, :]


def gqa_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention with grouped kv heads.

    q [B, T, H, hd], k/v [B, S, K, hd], mask <bool>[B, T, S] -> [B, T, H, hd].
    Logits are scaled by 1/sqrt(hd); the softmax runs in float32. Rows with no visible key (left padding)
    get a uniform distribution instead of NaN; their outputs are never used.

    Head-major inside: q, k, v are transposed to [B, K, G, T, hd] / [B, K, S, hd] (small) so that both
    einsums are plain batched matmuls over (B, K) and the [B, K, G, T, S] scores are never transposed;
    einsums on the [B, T, K, G, hd] layout made XLA transpose the scores (1.8x slower forward, 1.2x
    forward+backward at SmolLM2's shapes, T = 512 on CPU).
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, hd).transpose(0, 2, 3, 1, 4)          # [B, K, G, T, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # [B, K, S, hd]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)                        # [B, K, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def swiglu_hidden(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray) -> jnp.ndarray:
    """The input of down_proj: SiLU(x W_gate) * (x W_up). x [..., D], w [D, F] -> [..., F]."""
    return jax.nn.silu(x @ w_gate) * (x @ w_up)
