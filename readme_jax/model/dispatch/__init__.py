"""Dispatchers of the routed MoE FFN: one interface (base.py), one kernel per file.

    from readme_jax.model import dispatch
    d = dispatch.default_dispatcher(num_tokens)        # CPU: Grouped for a few tokens, else Blocked; GPU/TPU: Ragged
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
from readme_jax.model.dispatch.grouped import Grouped, GroupedPlan
from readme_jax.model.dispatch.masked import Masked, MaskedGate
from readme_jax.model.dispatch.ragged import Ragged, RaggedPlan

#: On CPU the grouped dispatcher is the default up to this many tokens per call (decode steps, small packed
#: steps). Measured (benchmarks/moe.py, moe_decode: 30 layers, D=576, Fe=768, E=5, skewed ids, --quick): grouped
#: vs decode 1.12x / 1.04x / 2.24x and vs blocked 1.93x / 1.24x / 1.45x faster at 1 / 8 / 32 rows. Larger calls
#: (prefill, training) keep blocked (its hand-written VJP; grouped is unmeasured there).
GROUPED_MAX_TOKENS = 32

__all__ = ["Dispatcher", "Plan", "Blocked", "BlockedPlan", "Ragged", "RaggedPlan", "Decode", "DecodePlan",
           "Grouped", "GroupedPlan", "Masked", "MaskedGate", "GROUPED_MAX_TOKENS", "DISPATCHERS",
           "default_dispatcher", "get"]


def default_dispatcher(num_tokens: int | None = None, name: str | None = None) -> Dispatcher:
    """GPU/TPU: Ragged. CPU: Grouped for at most GROUPED_MAX_TOKENS tokens, else Blocked (XLA lowers
    ragged_dot to a dense masked loop there). ``num_tokens`` None: the many-token default.

    Grouped and Decode are not the GPU/TPU default (unmeasured there: their conditionals may cost a predicate
    read-back per expert and layer); pass them explicitly to try. ``name`` (a config key: ``train.dispatcher``,
    the serve CLI's ``--dispatcher``) overrides the choice."""
    if name is not None:
        return get(name)
    if jax.default_backend() in ("gpu", "tpu"):
        return get("ragged")
    if num_tokens is not None and num_tokens <= GROUPED_MAX_TOKENS:
        return get("grouped")
    return get("blocked")


def get(name: str, **options) -> Dispatcher:
    """``DISPATCHERS.make(name, **options)``: the registered dispatcher ``name`` (ConfigError if unknown)."""
    return DISPATCHERS.make(name, **options)
