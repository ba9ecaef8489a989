"""The "grouped" dispatcher: tokens sorted by expert, each expert's matmuls on a window of its own rows only,
so a step's FLOPs follow its tokens and its weight bytes its distinct experts.

For each expert e (a static loop), one ``lax.switch`` picks the window of the sorted rows it runs on: none
(no token has e: its weights are never read) or the smallest power-of-two size C >= g_e (its group size),
starting at the group's first sorted row. The window is multiplied by e's static weights (no dynamic weight
slice: the per-expert split of ``prepare_layer``, as the decode dispatcher) and only its first g_e rows are
kept. Rows computed per layer <= sum_e 2 g_e <= 2N (the decode dispatcher: E_used x N; blocked: padded to
its tails). Sorting costs one gather of the rows each way.

The switch is a conditional per expert and layer: free on CPU, a host round trip on GPU; so this is a CPU
kernel (``dispatch.default_dispatcher`` picks it there by measurement; GPU/TPU keep ``ragged``).

Dimension names: N tokens, D model, Fe expert width, E experts, C window rows.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.model.dispatch.base import DISPATCHERS, Dispatcher, Plan, gather_rows
from readme_jax.model.dispatch.decode import split_experts
from readme_jax.model.layers import swiglu
from readme_jax.model.dispatch.ragged import Ragged
from readme_jax.model.varying import vary_like
from readme_jax.registry import SELF


@flax.struct.dataclass
class GroupedPlan(Plan):
    """sort_idx / unsort_idx <int32>[N] (as the ragged plan; tokens with no expert sort last),
    group_sizes <int32>[E], group_start <int32>[E] (first sorted row of each group); dispatcher,
    num_experts static."""

    sort_idx: jnp.ndarray
    unsort_idx: jnp.ndarray
    group_start: jnp.ndarray

    @property
    def num_tokens(self) -> int:
        return self.sort_idx.shape[0]


def window_sizes(num_tokens: int) -> tuple[int, ...]:
    """The window sizes C of a batch of N tokens: 1, 2, 4, ... up to N (N itself last)."""
    sizes, c = [], 1
    while c < num_tokens:
        sizes.append(c)
        c *= 2
    return tuple(sizes) + (num_tokens,)


@DISPATCHERS.register("grouped", SELF)
@dataclasses.dataclass(frozen=True)
class Grouped(Dispatcher):
    """A few to a few dozen tokens on CPU: sorted by expert, each used expert on a window of its own rows."""

    def plan(self, expert_ids: jnp.ndarray, num_experts: int) -> GroupedPlan:
        """expert_ids <int32>[B, T] or [N] -> GroupedPlan (a stable sort by expert). Jit-compatible."""
        r = Ragged().plan(expert_ids, num_experts)
        start = (jnp.cumsum(r.group_sizes) - r.group_sizes).astype(jnp.int32)
        return GroupedPlan(sort_idx=r.sort_idx, unsort_idx=r.unsort_idx, group_sizes=r.group_sizes,
                           group_start=start, dispatcher=self, num_experts=num_experts)

    def permute(self, plan: GroupedPlan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] -> [N, D] sorted by expert."""
        with jax.named_scope("permute"):
            return gather_rows(h, plan.sort_idx, plan.unsort_idx)

    def expert_ffn(self, plan: GroupedPlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [N, D] sorted -> [N, D]; w_gate/w_up [E, D, Fe] (or E out-major [D, Fe]), w_down [E, Fe, D] (or E)."""
        N, D = x.shape
        dt = x.dtype
        w_gate, w_up, w_down = (jax.tree.map(lambda a: vary_like(a, x), w) for w in (w_gate, w_up, w_down))
        sizes = window_sizes(N)
        buf = jnp.concatenate([x, jnp.zeros_like(x)])                     # windows never run past the end
        out = jnp.zeros_like(buf)
        with jax.named_scope("expert_ffn"):
            for e in range(plan.num_experts):
                g, start = plan.group_sizes[e], plan.group_start[e]

                def run(o, C, e=e, g=g, start=start):
                    wg, wu, wd = (w[e].astype(dt) for w in (w_gate, w_up, w_down))
                    xw = jax.lax.dynamic_slice_in_dim(buf, start, C, axis=0)
                    y = swiglu(xw, wg, wu, wd)
                    cur = jax.lax.dynamic_slice_in_dim(o, start, C, axis=0)
                    keep = (jnp.arange(C) < g)[:, None]
                    return jax.lax.dynamic_update_slice_in_dim(o, jnp.where(keep, y, cur), start, axis=0)

                branches = [lambda o: o] + [lambda o, C=C, run=run: run(o, C) for C in sizes]
                which = jnp.where(g > 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), g, side="left"), 0)
                out = jax.lax.switch(which, branches, out)
        return out[:N]

    def unpermute(self, plan: GroupedPlan, y: jnp.ndarray) -> jnp.ndarray:
        """[N, D] sorted -> [N, D] in token order (rows with no expert: 0)."""
        with jax.named_scope("unpermute"):
            return gather_rows(y, plan.unsort_idx, plan.sort_idx)

    def prepare_layer(self, layer: dict) -> dict:
        return split_experts(layer)
