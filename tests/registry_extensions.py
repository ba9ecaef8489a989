"""A scheduler, a cache policy and a dispatcher added the way a user adds one: one class + one decorator each.

tests/conftest.py imports this module before any test module is collected, so the serve CLI's choices and
every test parametrised over a registry (test_registries.py, test_moe.py, ...) include these entries.
"""

import dataclasses

import jax
import jax.numpy as jnp

from readme_jax.model.dispatch import DISPATCHERS, DecodePlan, Dispatcher
from readme_jax.registry import SELF
from readme_jax.serve.api import Pick
from readme_jax.serve.expert_cache import POLICIES, Policy
from readme_jax.serve.schedulers import SCHEDULERS, decode_order, fill_prefills


@SCHEDULERS.register("newest-first")
class NewestFirst:
    """Running decode tokens newest first (reverse decode FCFS), then prefill chunks with the budget left."""

    def pick(self, waiting, running, budget, free_slots):
        decodes = [r.slot for r in reversed(decode_order(running))][:budget]
        return Pick(prefills=tuple(fill_prefills(waiting, budget - len(decodes), free_slots)),
                    decodes=tuple(decodes))


@POLICIES.register("mru")
class MRU(Policy):
    """Most recently used (the worst choice for a looping reference string; correct all the same)."""

    def victim(self, candidates, future):
        return max(candidates, key=lambda e: (self.last_use.get(e, 0), -e))


@DISPATCHERS.register("onehot", SELF)
@dataclasses.dataclass(frozen=True)
class OneHot(Dispatcher):
    """Every expert on every token, kept by a one-hot mask (E times the FLOPs; a reference, not a kernel)."""

    def plan(self, expert_ids, num_experts):
        flat = expert_ids.reshape(-1).astype(jnp.int32)
        valid = (flat >= 0) & (flat < num_experts)
        return DecodePlan(expert_ids=jnp.where(valid, flat, -1),
                          group_sizes=jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=0),
                          dispatcher=self, num_experts=num_experts)

    def permute(self, plan, h):
        return h

    def expert_ffn(self, plan, x, w_gate, w_up, w_down):
        y = jnp.einsum("enf,efd->end", jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate))
                       * jnp.einsum("nd,edf->enf", x, w_up), w_down)                       # [E, N, D]
        keep = jax.nn.one_hot(plan.expert_ids, plan.num_experts, dtype=x.dtype)          # [N, E], -1 -> 0
        return jnp.einsum("end,ne->nd", y, keep)

    def unpermute(self, plan, y):
        return y
