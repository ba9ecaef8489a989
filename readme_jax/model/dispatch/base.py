"""The dispatcher interface of the routed MoE FFN, and the two pieces its kernels share.

A dispatcher runs one layer's top-1 expert FFN in three steps, from a plan made once per batch:

    plan = dispatcher.plan(expert_ids <int32>[N], num_experts=E)     # once per batch, outside the layer scan
    x    = dispatcher.permute(plan, h [N, D])                         # rows as the kernel wants them [P, D]
    y    = dispatcher.expert_ffn(plan, x, w_gate, w_up, w_down)       # each row through its expert's SwiGLU
    out  = dispatcher.unpermute(plan, y)                              # [N, D], token order

``readme_jax.model.moe.moe_ffn(plan, h, ...)`` composes the steps (with the shape checks); every plan names
the dispatcher that made it, so a prebuilt plan is all a backbone call needs. ``prepare_layer(layer)``
gives one layer's weights in the layout the dispatcher reads fastest (once, before a decode loop).

Contract of every dispatcher:
  * A dispatcher is a frozen dataclass (hashable: jit treats it as static); its plan is a pytree
    subclassing :class:`Plan` (``group_sizes <int32>[E]``, tokens per expert, an expert "in use" when its size
    is > 0; static ``dispatcher`` and ``num_experts``; ``num_tokens``).
  * Expert ids outside [0, E) - -1 for an inactive serving slot, or the id of another device's expert
    under expert parallelism - give their token no expert: its output row is 0 and it counts for no
    expert. Nothing is dropped otherwise.
  * Weights are one layer's: w_gate/w_up [E, D, Fe], w_down [E, Fe, D] (the decode dispatcher also takes
    them already split per expert, see decode.py). Inside ``jax.shard_map`` the weights are cast to the
    tokens' varying axes first (model/varying.py), so custom VJPs may return per-device weight gradients.
  * Differentiable in h and the weights (blocked: a hand-written VJP; ragged and decode: autodiff).

The dispatchers behind this interface, each registered in :data:`DISPATCHERS` by one decorator
(``@DISPATCHERS.register(name, SELF)``: the frozen dataclass's fields are its options); a config key
(``train.dispatcher``, the serve CLI's ``--dispatcher``) selects one by name over the default:
  "blocked"  blocked.py: sort-by-expert into a padded buffer, a loop over fixed-size blocks; CPU default.
  "ragged"   ragged.py: ``lax.ragged_dot`` over the sorted tokens; GPU/TPU default.
  "decode"   decode.py: a few tokens (decode steps): for each expert some token uses, its static weights
             on those rows; no sort, no dynamic weight slice.
  "grouped"  grouped.py: sorted by expert, each used expert's static weights on a power-of-two window of its
             own rows (FLOPs follow tokens, weight bytes distinct experts).
  "masked"   masked.py: tied experts only (``takes_tables``): every token through the channel tables, masked
             to its expert's channels (weight bytes one table whatever the experts; inference only).
How the later ones fit:
  resident slots (expert cache): the cache remaps expert ids to the k slots of its [k, D, Fe] pool (-1 for
    a token whose expert is not resident) and passes the pool as the weights; any dispatcher above then
    runs with num_experts = k, the plan still made once per batch.
  expert parallel: ``parallel.expert_parallel.ExpertParallel`` is one more dispatcher behind this interface
    (not registered: it needs a mesh and a capacity): ``plan`` picks each token's device, ``permute`` sends
    the rows there (``all_to_all`` inside one ``jax.shard_map``), ``expert_ffn`` runs the local experts with a
    registered dispatcher (``local``), ``unpermute`` sends them back.

Dimension names: N tokens, D model, Fe expert width, E experts, P rows of the kernel's buffer.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from readme_jax.registry import Registry

#: Every dispatcher by name (see the module docstring).
DISPATCHERS = Registry("dispatcher")


class Dispatcher(abc.ABC):
    """One way to run the routed FFN (see the module docstring). Subclasses are frozen dataclasses."""

    name: str = ""            # set by DISPATCHERS.register
    #: Whether ``prepare_layer`` takes a tied layer's channel tables as they are (the masked kernel) instead of
    #: the per-expert layout ``moe.fused_layer`` gathers from them.
    takes_tables: ClassVar[bool] = False

    @abc.abstractmethod
    def plan(self, expert_ids: jnp.ndarray, num_experts: int):
        """expert_ids <int32>[B, T] or [N] -> this dispatcher's plan (a pytree). Jit-compatible."""

    @abc.abstractmethod
    def permute(self, plan, h: jnp.ndarray) -> jnp.ndarray:
        """h [N, D] -> the kernel's rows [P, D]."""

    @abc.abstractmethod
    def expert_ffn(self, plan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [P, D] -> [P, D]: each row's SwiGLU with its expert's weights (w_gate/w_up [E, D, Fe],
        w_down [E, Fe, D]); rows with no expert give 0."""

    @abc.abstractmethod
    def unpermute(self, plan, y: jnp.ndarray) -> jnp.ndarray:
        """The kernel's rows [P, D] -> [N, D] in token order."""

    def prepare_layer(self, layer: dict) -> dict:
        """One layer's params in the layout this dispatcher reads fastest, made once before a decode loop
        (default: as they are)."""
        return layer

    def check_plan(self, plan: "Plan") -> None:
        """Raise ValueError unless ``plan`` was made by this dispatcher."""
        if getattr(plan, "dispatcher", None) != self:
            raise ValueError(f"dispatcher {self!r}: got a plan made by {getattr(plan, 'dispatcher', None)!r}")


@flax.struct.dataclass
class Plan:
    """The fields every dispatch plan has (a subclass adds its own, keyword-constructed):
    group_sizes <int32>[E] tokens per expert; dispatcher (the one that made it) and num_experts, static."""

    group_sizes: jnp.ndarray
    dispatcher: Dispatcher = flax.struct.field(pytree_node=False)
    num_experts: int = flax.struct.field(pytree_node=False)

    @property
    def num_tokens(self) -> int:
        """N, the tokens the plan routes."""
        raise NotImplementedError


def group_ranks(expert_ids: jnp.ndarray, num_experts: int):
    """Each token's place in its expert's group, in token order.

    expert_ids <int32>[N] -> (valid <bool>[N] (id in [0, E)), expert <int32>[N] (invalid -> 0),
    group_sizes <int32>[E] (valid tokens per expert), rank <int32>[N] (index within its group; 0 if invalid)).
    """
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    valid = (flat >= 0) & (flat < num_experts)
    expert = jnp.where(valid, flat, 0)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)                        # [N, E], 0 if invalid
    group_sizes = jnp.sum(onehot, axis=0)                                               # [E]
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)                   # [N]
    return valid, expert, group_sizes, rank


@jax.custom_vjp
def gather_rows(x: jnp.ndarray, idx: jnp.ndarray, inv_idx: jnp.ndarray) -> jnp.ndarray:
    """x [M, D] -> x[idx] [len(idx), D], out-of-range rows = 0; its transpose is the inverse gather.

    idx <int32>[K] must be injective on its in-range entries and inv_idx <int32>[M] its inverse
    (inv_idx[idx[i]] = i, out of range where x's row is never read), so the VJP is a gather, not a scatter-add."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, idx, inv_idx):
    return gather_rows(x, idx, inv_idx), (idx, inv_idx)


def _gather_rows_bwd(res, g):
    idx, inv_idx = res
    return jnp.take(g, inv_idx, axis=0, mode="fill", fill_value=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
