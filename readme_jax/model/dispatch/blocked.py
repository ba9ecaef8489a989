"""The "blocked" dispatcher (CPU default): tokens grouped by expert into a padded buffer, then a loop over
fixed-size blocks of rows, each block against its one expert's weights, with a hand-written VJP.

Each expert's group is padded to a multiple of ``tail_size`` rows (s) and covered by blocks of
``block_size`` rows (S), then tail blocks of s rows, so each block belongs to one expert and at most s - 1
rows per expert are padding. Static shapes, no drops: padded rows P <= N + E (s - 1).

Dimension names: N tokens, D model, Fe expert width, E experts, P padded rows, NB / NT block-list
lengths, S block size, s tail size.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.model.dispatch.base import DISPATCHERS, Dispatcher, Plan, gather_rows, group_ranks
from readme_jax.model.varying import vary_like, zeros_like_varying
from readme_jax.registry import SELF

DEFAULT_BLOCK_SIZE = 512
DEFAULT_TAIL_SIZE = 128


@flax.struct.dataclass
class BlockedPlan(Plan):
    """Where each token sits in the padded, expert-grouped buffer, and the blocks that cover it.

    group_sizes     <int32>[E]   tokens per expert
    slot_of_token   <int32>[N]   row of each token in the padded buffer (P: no expert)
    token_of_slot   <int32>[P]   token in each padded row; N marks a padding row
    block_offset    <int32>[NB]  first padded row of each S-row block;  block_expert <int32>[NB] its expert
    tail_offset     <int32>[NT]  first padded row of each tail block;   tail_expert  <int32>[NT] its expert
    num_used_blocks, num_used_tails  <int32>[]   only the first entries of each list run
    dispatcher, num_experts, block_size, tail_size  static
    """

    slot_of_token: jnp.ndarray
    token_of_slot: jnp.ndarray
    block_offset: jnp.ndarray
    block_expert: jnp.ndarray
    num_used_blocks: jnp.ndarray
    tail_offset: jnp.ndarray
    tail_expert: jnp.ndarray
    num_used_tails: jnp.ndarray
    block_size: int = flax.struct.field(pytree_node=False)
    tail_size: int = flax.struct.field(pytree_node=False)

    @property
    def num_tokens(self) -> int:
        return self.slot_of_token.shape[0]

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


@DISPATCHERS.register("blocked", SELF)
@dataclasses.dataclass(frozen=True)
class Blocked(Dispatcher):
    """Sort by expert into a padded buffer, then a loop over fixed-size blocks (CPU default).

    block_size / tail_size: None = DEFAULT_BLOCK_SIZE / DEFAULT_TAIL_SIZE (best measured on CPU at
    N=4096, E=4..8), shrunk for small batches: block <= a power of two >= N, tail <= one >= N / E.
    block_size must be a multiple of tail_size (equal: one level, up to block_size - 1 padding rows per
    expert)."""

    block_size: int | None = None
    tail_size: int | None = None

    def sizes(self, num_tokens: int, num_experts: int) -> tuple[int, int]:
        """(S, s) for a batch of N tokens and E experts."""
        pow2 = lambda k: max(8, 1 << max(0, k - 1).bit_length())
        block = self.block_size or min(DEFAULT_BLOCK_SIZE, pow2(num_tokens))
        tail = self.tail_size or min(DEFAULT_TAIL_SIZE, block, pow2(-(-num_tokens // num_experts)))
        if block % tail:
            raise ValueError(f"Blocked: block_size={block} must be a multiple of tail_size={tail}")
        return block, tail

    def plan(self, expert_ids: jnp.ndarray, num_experts: int) -> BlockedPlan:
        """expert_ids <int32>[B, T] or [N] -> BlockedPlan. Jit-compatible."""
        n = expert_ids.size
        block_size, tail_size = self.sizes(n, num_experts)
        P = padded_rows(n, num_experts, tail_size)
        tails_per_group = block_size // tail_size - 1
        with jax.named_scope("plan_dispatch"):
            valid, e, group_sizes, rank = group_ranks(expert_ids, num_experts)
            padded = -(-group_sizes // tail_size) * tail_size
            pad_start = jnp.cumsum(padded) - padded
            slot_of_token = jnp.where(valid, pad_start[e] + rank, P).astype(jnp.int32)              # [N]
            tokens = jnp.arange(n, dtype=jnp.int32)
            token_of_slot = jnp.full(P, n, jnp.int32).at[slot_of_token].set(tokens, mode="drop")
            n_big = padded // block_size
            block = _block_list(n_big, pad_start, block_size, max(1, P // block_size))
            tail = _block_list((padded - n_big * block_size) // tail_size, pad_start + n_big * block_size,
                               tail_size, min(num_experts * tails_per_group, P // tail_size))
        return BlockedPlan(group_sizes=group_sizes, slot_of_token=slot_of_token, token_of_slot=token_of_slot,
                           block_offset=block[0], block_expert=block[1], num_used_blocks=block[2],
                           tail_offset=tail[0], tail_expert=tail[1], num_used_tails=tail[2],
                           dispatcher=self, num_experts=num_experts, block_size=block_size, tail_size=tail_size)

    def permute(self, plan: BlockedPlan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] -> the padded, expert-grouped rows [P, D] (padding rows zero)."""
        with jax.named_scope("permute"):
            return gather_rows(h, plan.token_of_slot, plan.slot_of_token)

    def expert_ffn(self, plan: BlockedPlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [P, D] -> [P, D]; w_gate/w_up [E, D, Fe], w_down [E, Fe, D]."""
        dt = x.dtype
        w_gate, w_up, w_down = (vary_like(w.astype(dt), x) for w in (w_gate, w_up, w_down))
        with jax.named_scope("expert_ffn"):
            lists, rows = plan.levels
            return _blocked_swiglu(rows, lists, x, w_gate, w_up, w_down)

    def unpermute(self, plan: BlockedPlan, y: jnp.ndarray) -> jnp.ndarray:
        """[P, D] -> [N, D] in token order."""
        with jax.named_scope("unpermute"):
            return gather_rows(y, plan.slot_of_token, plan.token_of_slot)


# --- the kernel: loops over blocks of rows, each against its expert's weights ------------------------------
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
