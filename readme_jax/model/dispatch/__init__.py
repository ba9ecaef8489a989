"""Dispatchers of the routed MoE FFN: one interface (base.py), one kernel per file.

    from readme_jax.model import dispatch
    d = dispatch.default_dispatcher(num_tokens)        # CPU: Decode for a few tokens, else Blocked; GPU/TPU: Ragged
    plan = d.plan(expert_ids, num_experts)             # once per batch, outside the layer scan
    y = moe.moe_ffn(plan, h, w_gate, w_up, w_down)     # permute -> expert FFN -> unpermute

See base.py for the interface, its contract (ids outside [0, E) get no expert), the registry
(``DISPATCHERS``; ``get(name)``) and how the resident-slot and expert-parallel dispatchers fit behind it.
"""

from __future__ import annotations

import jax

from readme_jax.model.dispatch.base import DISPATCHERS, Dispatcher, Plan
from readme_jax.model.dispatch.blocked import Blocked, BlockedPlan
from readme_jax.model.dispatch.decode import Decode, DecodePlan
from readme_jax.model.dispatch.ragged import Ragged, RaggedPlan

#: The decode dispatcher is the default up to this many tokens per call (a decode step over a few slots).
#: Each expert in use runs on every row, so past a few rows it is compute-bound; measured (benchmarks/moe.py,
#: moe_decode, 30 layers, E=5): B=1 about 0.5x the dense FFN's time, B=8 about the dense FFN's.
DECODE_MAX_TOKENS = 8

__all__ = ["Dispatcher", "Plan", "Blocked", "BlockedPlan", "Ragged", "RaggedPlan", "Decode", "DecodePlan",
           "DECODE_MAX_TOKENS", "DISPATCHERS", "default_dispatcher", "get"]


def default_dispatcher(num_tokens: int | None = None, name: str | None = None) -> Dispatcher:
    """GPU/TPU: Ragged. CPU: Decode for at most DECODE_MAX_TOKENS tokens, else Blocked (XLA lowers
    ragged_dot to a dense masked loop there). ``num_tokens`` None: the many-token default.

    Decode is not the GPU/TPU default (unmeasured there: a conditional may cost a predicate read-back per
    expert and layer); pass it explicitly to try. ``name`` (a config key: ``train.dispatcher``, the serve
    CLI's ``--dispatcher``) overrides the choice."""
    if name is not None:
        return get(name)
    if jax.default_backend() in ("gpu", "tpu"):
        return get("ragged")
    if num_tokens is not None and num_tokens <= DECODE_MAX_TOKENS:
        return get("decode")
    return get("blocked")


def get(name: str, **options) -> Dispatcher:
    """``DISPATCHERS.make(name, **options)``: the registered dispatcher ``name`` (ConfigError if unknown)."""
    return DISPATCHERS.make(name, **options)
