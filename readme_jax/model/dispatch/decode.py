"""The "decode" dispatcher: a few tokens (a decode step over a few serving slots), read only the experts
some token uses, each from static weights.

For each expert e (a static Python loop), ``lax.cond(any token has e, ...)`` runs e's SwiGLU on all N rows
and keeps the rows of e's tokens; an expert no token uses costs one predicate. There is no sort and no
dynamic slice of the weights: the blocked kernel's per-block ``w[e]`` with a traced e copies the expert's
weights (as many bytes as the matmuls read), which at N = 1 made a Read-ME decode step cost about a dense
one. Expert ids outside [0, E) (-1: an inactive slot) match no expert: their rows stay 0.

Weights: one layer's w_gate/w_up [E, D, Fe], w_down [E, Fe, D], or the same already split per expert
(sequences of E out-major weights of logical shape [D, Fe] / [Fe, D], ``split_experts``). Inside a decode loop prefer the split
form, made once before the loop: a static ``w[e]`` of a stacked array taken inside the loop is a copy too
(only when its branch runs).

Compute is E_used x N rows per layer (each used expert sees every row), so this pays while the step is
bound by reading the weights, i.e. for small N (the grouped dispatcher measured faster at 1-32 rows);
plan/permute/unpermute are free.

Dimension names: N tokens, D model, Fe expert width, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.model.dispatch.base import DISPATCHERS, Dispatcher, Plan
from readme_jax.model.layers import OutMajor, swiglu
from readme_jax.model.varying import vary_like
from readme_jax.registry import SELF

EXPERT_KEYS = ("w_gate", "w_up", "w_down")


@flax.struct.dataclass
class DecodePlan(Plan):
    """expert_ids <int32>[N] (ids outside [0, E) as -1), group_sizes <int32>[E]; dispatcher, num_experts static."""

    expert_ids: jnp.ndarray

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]


def num_experts_of(w: jnp.ndarray | Sequence[jnp.ndarray]) -> int:
    """E of one layer's expert weight: [E, ...], a sequence of E (out-major) weights, or a masked kernel's gate
    (``masked.MaskedGate``: its ``num_experts``)."""
    if hasattr(w, "num_experts"):
        return w.num_experts
    return len(w) if isinstance(w, (tuple, list)) else w.shape[0]


@DISPATCHERS.register("decode", SELF)
@dataclasses.dataclass(frozen=True)
class Decode(Dispatcher):
    """A few tokens (decode steps): each expert some token uses runs on those rows; no sort."""

    def plan(self, expert_ids: jnp.ndarray, num_experts: int) -> DecodePlan:
        """expert_ids <int32>[B, T] or [N] -> DecodePlan. Jit-compatible."""
        flat = expert_ids.reshape(-1).astype(jnp.int32)
        with jax.named_scope("plan_dispatch"):
            flat = jnp.where((flat >= 0) & (flat < num_experts), flat, -1)
            group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32), axis=0,
                                  dtype=jnp.int32)
        return DecodePlan(expert_ids=flat, group_sizes=group_sizes, dispatcher=self, num_experts=num_experts)

    def permute(self, plan: DecodePlan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] -> h: rows stay in token order."""
        return h

    def expert_ffn(self, plan: DecodePlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [N, D] -> [N, D]; w_gate/w_up [E, D, Fe] (or E out-major [D, Fe]), w_down [E, Fe, D] (or E [Fe, D])."""
        dt = x.dtype
        # the varying cast outside the branches (under shard_map its transpose is a psum over the devices,
        # which must not sit in a branch only some devices take); the dtype cast inside (used experts only)
        w_gate, w_up, w_down = (jax.tree.map(lambda a: vary_like(a, x), w) for w in (w_gate, w_up, w_down))
        out = jnp.zeros_like(x)
        with jax.named_scope("expert_ffn"):
            for e in range(plan.num_experts):
                rows = plan.expert_ids == e                                                   # [N]

                def run(o, e=e, rows=rows):
                    g, u, d = (w[e].astype(dt) for w in (w_gate, w_up, w_down))
                    y = swiglu(x, g, u, d)
                    return jnp.where(rows[:, None], y, o)

                out = jax.lax.cond(plan.group_sizes[e] > 0, run, lambda o: o, out)
        return out

    def unpermute(self, plan: DecodePlan, y: jnp.ndarray) -> jnp.ndarray:
        """[N, D] -> [N, D]: already in token order."""
        return y

    def prepare_layer(self, layer: dict) -> dict:
        return split_experts(layer)


def split_experts(layer: dict) -> dict:
    """One layer's params with w_gate/w_up/w_down [E, ...] split into tuples of E out-major weights
    (``layers.OutMajor``: static per-expert weights, XLA CPU's faster dot form; once, before a decode loop,
    e.g. over ``decoder.unstack_layers``); other entries as they are."""
    return {k: tuple(OutMajor.of(v[e]) for e in range(v.shape[0])) if k in EXPERT_KEYS else v
            for k, v in layer.items()}
