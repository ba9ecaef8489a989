"""The "ragged" dispatcher (GPU/TPU default): tokens sorted by expert, unpadded, through ``lax.ragged_dot``.

On CPU XLA lowers ragged_dot to a dense masked loop over the experts (O(E) x a dense FFN), so it is not
the default there. Tokens with no expert sort after every group and get 0.

Dimension names: N tokens, D model, Fe expert width, E experts.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.model.dispatch.base import DISPATCHERS, Dispatcher, Plan, gather_rows, group_ranks
from readme_jax.model.varying import vary_like
from readme_jax.registry import SELF


@flax.struct.dataclass
class RaggedPlan(Plan):
    """sort_idx <int32>[N]: token at each position of the expert-sorted order; unsort_idx <int32>[N]: each
    token's position in it (the inverse); group_sizes <int32>[E]; dispatcher, num_experts static."""

    sort_idx: jnp.ndarray
    unsort_idx: jnp.ndarray

    @property
    def num_tokens(self) -> int:
        return self.sort_idx.shape[0]


@DISPATCHERS.register("ragged", SELF)
@dataclasses.dataclass(frozen=True)
class Ragged(Dispatcher):
    """``lax.ragged_dot`` over the expert-sorted tokens (GPU/TPU default)."""
    def plan(self, expert_ids: jnp.ndarray, num_experts: int) -> RaggedPlan:
        """expert_ids <int32>[B, T] or [N] -> RaggedPlan (a stable sort by expert). Jit-compatible."""
        n = expert_ids.size
        with jax.named_scope("plan_dispatch"):
            valid, e, group_sizes, rank = group_ranks(expert_ids, num_experts)
            group_start = jnp.cumsum(group_sizes) - group_sizes
            rank_invalid = jnp.sum(group_sizes) + jnp.cumsum(~valid) - 1
            sorted_pos = jnp.where(valid, group_start[e] + rank, rank_invalid).astype(jnp.int32)     # [N]
            sort_idx = jnp.zeros(n, jnp.int32).at[sorted_pos].set(jnp.arange(n, dtype=jnp.int32),
                                                                  unique_indices=True)
        return RaggedPlan(sort_idx=sort_idx, unsort_idx=sorted_pos, group_sizes=group_sizes,
                          dispatcher=self, num_experts=num_experts)

    def permute(self, plan: RaggedPlan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] -> [N, D] sorted by expert."""
        with jax.named_scope("permute"):
            return gather_rows(h, plan.sort_idx, plan.unsort_idx)

    def expert_ffn(self, plan: RaggedPlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [N, D] sorted -> [N, D]; w_gate/w_up [E, D, Fe], w_down [E, Fe, D]."""
        dt = x.dtype
        w_gate, w_up, w_down = (vary_like(w.astype(dt), x) for w in (w_gate, w_up, w_down))
        gs = plan.group_sizes
        with jax.named_scope("expert_ffn"):
            act = jax.nn.silu(jax.lax.ragged_dot(x, w_gate, gs)) * jax.lax.ragged_dot(x, w_up, gs)
            y = jax.lax.ragged_dot(act, w_down, gs)
            return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(gs))[:, None], y, 0)   # rows with no expert

    def unpermute(self, plan: RaggedPlan, y: jnp.ndarray) -> jnp.ndarray:
        """[N, D] sorted -> [N, D] in token order."""
        with jax.named_scope("unpermute"):
            return gather_rows(y, plan.unsort_idx, plan.sort_idx)
