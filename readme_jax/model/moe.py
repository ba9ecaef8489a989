"""The routed MoE FFN: top-1 experts chosen once per batch by the pre-gating router, shared by every layer.

The data's way through one layer, each step a small function under ``jax.named_scope``:
  plan_dispatch (once per batch, outside the layer scan)  expert_ids -> DispatchPlan
  _permute      h [N, D] -> x [P, D]       tokens grouped by expert (each group padded to the tail size)
  _expert_ffn   x [P, D] -> y [P, D]       every block of rows through its expert's SwiGLU
  _unpermute    y [P, D] -> [N, D]         back to token order

Two grouped-matmul kernels share the plan:
  "blocked"  CPU default. Each expert's group is padded to a multiple of ``tail_size`` rows and covered by
             blocks of ``block_size`` rows plus tail blocks of ``tail_size`` rows, each block of one expert;
             a loop runs each used block against its expert's weights (matmuls of [S, D] x [D, Fe]),
             with a hand-written VJP. Static shapes, no drops; padded rows P <= N + E * (tail_size - 1).
  "ragged"   GPU/TPU default: ``lax.ragged_dot`` over the unpadded sorted tokens (on CPU XLA lowers it to a
             dense masked loop over experts, O(E) x dense, so it is not used there).
``reference_moe_ffn`` (every expert on every token, then select) is the slow oracle for tests.

Dimension names: B batch, T time, N = B*T tokens, D model, Fe expert width, E experts, P padded rows,
NB / NT block-list lengths, S block size, s tail size.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.parallel.varying import vary_like, zeros_like_varying

DEFAULT_BLOCK_SIZE = 512
DEFAULT_TAIL_SIZE = 128
IMPLS = ("blocked", "ragged")


@flax.struct.dataclass
class DispatchPlan:
    """Everything derived from the expert ids, computed once per batch and closed over by every layer.

    The padded buffer holds each expert's group padded to a multiple of ``tail_size`` rows. The blocked
    kernel covers group e with floor(padded_e / S) blocks of S = ``block_size`` rows, then tail blocks of
    ``tail_size`` rows, so each block belongs to one expert and at most tail_size - 1 rows per expert are
    padding. Block lists are static-length bounds; only the first ``num_used_*`` entries are run.

    sort_idx        <int32>[N]   token index at each position of the expert-sorted (unpadded) order
    unsort_idx      <int32>[N]   position of each token in that sorted order (inverse of sort_idx)
    group_sizes     <int32>[E]   tokens per expert
    slot_of_token   <int32>[N]   row of each token in the padded, expert-grouped buffer (P: no expert)
    token_of_slot   <int32>[P]   token in each padded row; N marks a padding row
    block_offset    <int32>[NB]  first padded row of each S-row block;  block_expert <int32>[NB] its expert
    tail_offset     <int32>[NT]  first padded row of each tail block;   tail_expert  <int32>[NT] its expert
    num_used_blocks, num_used_tails  <int32>[]
    num_experts, block_size, tail_size  static
    """

    sort_idx: jnp.ndarray
    unsort_idx: jnp.ndarray
    group_sizes: jnp.ndarray
    slot_of_token: jnp.ndarray
    token_of_slot: jnp.ndarray
    block_offset: jnp.ndarray
    block_expert: jnp.ndarray
    num_used_blocks: jnp.ndarray
    tail_offset: jnp.ndarray
    tail_expert: jnp.ndarray
    num_used_tails: jnp.ndarray
    num_experts: int = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)
    tail_size: int = flax.struct.field(pytree_node=False)

    @property
    def num_tokens(self) -> int:
        return self.sort_idx.shape[0]

    @property
    def levels(self):
        """(offsets, experts, num_used) of the block list, then of the tail list; and their rows per block."""
        return (((self.block_offset, self.block_expert, self.num_used_blocks),
                 (self.tail_offset, self.tail_expert, self.num_used_tails)), (self.block_size, self.tail_size))


def padded_rows(num_tokens: int, num_experts: int, tail_size: int) -> int:
    """Static P: sum_e ceil(g_e / s) s <= N + E (s - 1), rounded down to a multiple of s (and >= s)."""
    return max(1, (num_tokens + num_experts * (tail_size - 1)) // tail_size) * tail_size


def _block_list(counts, first_row, rows, length):
    """Static-length list of blocks: counts[e] blocks of ``rows`` rows for expert e, the first at first_row[e].
    Returns (offsets <int32>[length], experts <int32>[length], number used)."""
    end = jnp.cumsum(counts)
    j = jnp.arange(length, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(end, j, side="right"), counts.shape[0] - 1).astype(jnp.int32)
    offset = first_row[e] + (j - (end - counts)[e]) * rows
    return offset.astype(jnp.int32), e, end[-1].astype(jnp.int32)


def plan_dispatch(expert_ids: jnp.ndarray, num_experts: int, *, block_size: int | None = None,
                  tail_size: int | None = None) -> DispatchPlan:
    """Dispatch plan of top-1 routing. expert_ids <int32>[B, T] or [N]. Jit-compatible.

    Ids outside [0, E) mark tokens with no expert here (expert parallelism: another device's expert): they
    get no rows, moe_ffn returns zeros for them and they sort after every group.

    block_size must be a multiple of tail_size (equal: one level, up to block_size - 1 padding rows per
    expert). Defaults: DEFAULT_BLOCK_SIZE / DEFAULT_TAIL_SIZE (best measured on CPU at N=4096, E=4..8),
    shrunk for small batches (decode): block <= a power of two >= N, tail <= one >= N / E."""
    n = expert_ids.size
    pow2 = lambda k: max(8, 1 << max(0, k - 1).bit_length())
    block_size = block_size or min(DEFAULT_BLOCK_SIZE, pow2(n))
    tail_size = tail_size or min(DEFAULT_TAIL_SIZE, block_size, pow2(-(-n // num_experts)))
    if block_size % tail_size:
        raise ValueError(f"plan_dispatch: block_size={block_size} must be a multiple of tail_size={tail_size}")
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    P = padded_rows(n, num_experts, tail_size)
    tails_per_group = block_size // tail_size - 1
    with jax.named_scope("plan_dispatch"):
        valid = (flat >= 0) & (flat < num_experts)
        e = jnp.where(valid, flat, 0)
        onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)                    # [N, E], 0 if invalid
        group_sizes = jnp.sum(onehot, axis=0)                                           # [E]
        rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)               # [N] rank within group
        group_start = jnp.cumsum(group_sizes) - group_sizes
        padded = -(-group_sizes // tail_size) * tail_size
        pad_start = jnp.cumsum(padded) - padded
        rank_invalid = jnp.sum(group_sizes) + jnp.cumsum(~valid) - 1
        sorted_pos = jnp.where(valid, group_start[e] + rank, rank_invalid).astype(jnp.int32)     # [N]
        slot_of_token = jnp.where(valid, pad_start[e] + rank, P).astype(jnp.int32)              # [N]
        tokens = jnp.arange(n, dtype=jnp.int32)
        sort_idx = jnp.zeros(n, jnp.int32).at[sorted_pos].set(tokens, unique_indices=True)
        token_of_slot = jnp.full(P, n, jnp.int32).at[slot_of_token].set(tokens, mode="drop")
        n_big = padded // block_size
        block = _block_list(n_big, pad_start, block_size, max(1, P // block_size))
        tail = _block_list((padded - n_big * block_size) // tail_size, pad_start + n_big * block_size,
                           tail_size, min(num_experts * tails_per_group, P // tail_size))
    return DispatchPlan(sort_idx=sort_idx, unsort_idx=sorted_pos, group_sizes=group_sizes,
                        slot_of_token=slot_of_token, token_of_slot=token_of_slot,
                        block_offset=block[0], block_expert=block[1], num_used_blocks=block[2],
                        tail_offset=tail[0], tail_expert=tail[1], num_used_tails=tail[2],
                        num_experts=num_experts, block_size=block_size, tail_size=tail_size)


# --- row gathers whose transpose is the inverse gather (not a scatter-add) ----------------------------------

@jax.custom_vjp
def _gather_rows(x: jnp.ndarray, idx: jnp.ndarray, inv_idx: jnp.ndarray) -> jnp.ndarray:
    """x[idx] with out-of-range rows = 0. idx must be injective on its in-range entries and inv_idx its
    inverse (inv_idx[idx[i]] = i, out-of-range where x's row is never read), so the VJP is a gather too."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, idx, inv_idx):
    return _gather_rows(x, idx, inv_idx), (idx, inv_idx)


def _gather_rows_bwd(res, g):
    idx, inv_idx = res
    return jnp.take(g, inv_idx, axis=0, mode="fill", fill_value=0), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


# --- the three steps ---------------------------------------------------------------------------------------

def _permute(plan: DispatchPlan, h: jnp.ndarray, impl: str) -> jnp.ndarray:
    """h [N, D] -> expert-grouped rows: [P, D] (blocked, padding rows zero) or [N, D] (ragged)."""
    with jax.named_scope("permute"):
        if impl == "ragged":
            return _gather_rows(h, plan.sort_idx, plan.unsort_idx)
        return _gather_rows(h, plan.token_of_slot, plan.slot_of_token)


def _unpermute(plan: DispatchPlan, y: jnp.ndarray, impl: str) -> jnp.ndarray:
    """Inverse of _permute: grouped rows -> [N, D] in token order."""
    with jax.named_scope("unpermute"):
        if impl == "ragged":
            return _gather_rows(y, plan.unsort_idx, plan.sort_idx)
        return _gather_rows(y, plan.slot_of_token, plan.token_of_slot)


def _expert_ffn(plan: DispatchPlan, x: jnp.ndarray, w_gate, w_up, w_down, impl: str) -> jnp.ndarray:
    """SwiGLU of each row with its expert's weights. w_gate/w_up [E, D, Fe], w_down [E, Fe, D]."""
    dt = x.dtype
    w_gate, w_up, w_down = (vary_like(w.astype(dt), x) for w in (w_gate, w_up, w_down))
    with jax.named_scope("expert_ffn"):
        if impl == "ragged":
            gs = plan.group_sizes
            act = jax.nn.silu(jax.lax.ragged_dot(x, w_gate, gs)) * jax.lax.ragged_dot(x, w_up, gs)
            y = jax.lax.ragged_dot(act, w_down, gs)
            return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(gs))[:, None], y, 0)   # rows with no expert
        lists, rows = plan.levels
        return _blocked_swiglu(rows, lists, x, w_gate, w_up, w_down)


# --- the blocked kernel: loops over blocks of rows, each against its expert's weights ---------------------
# Its VJP is written out so the weight gradients accumulate in place per block (dW[e] += ...) instead of
# autodiff's dense [E, D, Fe] cotangent per block; list entries past the used count never run.

def _silu_parts(g):
    sg = jax.nn.sigmoid(g)
    return g * sg, sg * (1 + g * (1 - sg))                        # silu(g), silu'(g)


def _for_blocks(rows_per_level, lists, fn, carry):
    """carry = fn(carry, e, offset, rows) for every used block of every level (block list, then tails).
    A while loop over the used count (differentiated by the custom VJP below, never by autodiff)."""
    for rows, (offsets, experts, num_used) in zip(rows_per_level, lists):
        if offsets.shape[0]:
            carry = jax.lax.fori_loop(0, num_used, lambda j, c, rows=rows, o=offsets, x=experts:
                                      fn(c, x[j], o[j], rows), carry)
    return carry


def _rows(a, off, rows):
    return jax.lax.dynamic_slice_in_dim(a, off, rows, axis=0)


def _put(a, b, off):
    return jax.lax.dynamic_update_slice_in_dim(a, b, off, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_swiglu(rows, lists, x, w_gate, w_up, w_down):
    """x [P, D] grouped rows -> [P, D]; each block of ``lists`` uses its expert's weights."""
    return _blocked_swiglu_fwd(rows, lists, x, w_gate, w_up, w_down, save=False)[0]


def _blocked_swiglu_fwd(rows_per_level, lists, x, w_gate, w_up, w_down, save=True):
    P = x.shape[0]
    Fe = w_gate.shape[-1]

    def block(c, e, off, rows):
        xb = _rows(x, off, rows)
        g, u = xb @ w_gate[e], xb @ w_up[e]
        y = (jax.nn.silu(g) * u) @ w_down[e]
        return (_put(c[0], y, off),) + ((_put(c[1], g, off), _put(c[2], u, off)) if save else ())

    init = (jnp.zeros_like(x),) + ((jnp.zeros_like(x, shape=(P, Fe)),) * 2 if save else ())  # *_like: keeps
    # shard_map's varying-axes type of x
    out = _for_blocks(rows_per_level, lists, block, init)
    return out[0], (lists, x, out[1:], w_gate, w_up, w_down)


def _blocked_swiglu_bwd(rows_per_level, res, dy):
    lists, x, (g, u), w_gate, w_up, w_down = res
    acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype

    def block(c, e, off, rows):
        dx, dwg, dwu, dwd = c
        xb, gb, ub, dyb = (_rows(a, off, rows) for a in (x, g, u, dy))
        silu, dsilu = _silu_parts(gb)
        dwd = dwd.at[e].add(((silu * ub).T @ dyb).astype(acc))
        da = dyb @ w_down[e].T
        dg, du = da * ub * dsilu, da * silu
        dx = _put(dx, dg @ w_gate[e].T + du @ w_up[e].T, off)
        dwg = dwg.at[e].add((xb.T @ dg).astype(acc))
        dwu = dwu.at[e].add((xb.T @ du).astype(acc))
        return dx, dwg, dwu, dwd

    init = (jnp.zeros_like(x),) + tuple(zeros_like_varying(w, acc) for w in (w_gate, w_up, w_down))
    dx, dwg, dwu, dwd = _for_blocks(rows_per_level, lists, block, init)
    return None, dx, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


_blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def default_impl() -> str:
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "blocked"


def moe_ffn(plan: DispatchPlan, h: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
            w_down: jnp.ndarray, *, impl: str | None = None) -> jnp.ndarray:
    """Top-1 routed SwiGLU FFN. h [B, T, D] (or [N, D]); w_gate/w_up [E, D, Fe], w_down [E, Fe, D].

    Returns [B, T, D]: token t gets (SiLU(h_t W_gate[e]) * (h_t W_up[e])) W_down[e], e = its expert.
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"moe_ffn: impl must be one of {IMPLS}, got {impl!r}")
    shape = h.shape
    if w_gate.shape[0] != plan.num_experts:
        raise ValueError(f"moe_ffn: w_gate has {w_gate.shape[0]} experts, the plan {plan.num_experts}")
    flat = h.reshape(-1, shape[-1])
    if flat.shape[0] != plan.num_tokens:
        raise ValueError(f"moe_ffn: h has {flat.shape[0]} tokens, the plan {plan.num_tokens}")
    x = _permute(plan, flat, impl)
    y = _expert_ffn(plan, x, w_gate, w_up, w_down, impl)
    return _unpermute(plan, y, impl).reshape(shape)


def moe_ffn_fn(plan: DispatchPlan, *, impl: str | None = None) -> Callable:
    """ffn_fn for ``run_layers``: reads layer_params["w_gate"|"w_up"|"w_down"] ([E, ...] per layer)."""
    def ffn(p: dict, h: jnp.ndarray):
        return moe_ffn(plan, h, p["w_gate"], p["w_up"], p["w_down"], impl=impl), None
    return ffn


def reference_moe_ffn(expert_ids: jnp.ndarray, h: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
    """Masked-dense oracle: every expert's FFN on every token, then each token keeps its expert's output."""
    dt = h.dtype
    act = jax.nn.silu(jnp.einsum("...d,edf->...ef", h, w_gate.astype(dt))) * \
        jnp.einsum("...d,edf->...ef", h, w_up.astype(dt))
    y = jnp.einsum("...ef,efd->...ed", act, w_down.astype(dt))                         # [..., E, D]
    onehot = jax.nn.one_hot(expert_ids.reshape(h.shape[:-1]), w_gate.shape[0], dtype=dt)
    return jnp.einsum("...ed,...e->...d", y, onehot)
