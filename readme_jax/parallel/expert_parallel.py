"""Expert-parallel MoE FFN: experts sharded over a mesh axis (default "expert"), tokens sharded over the same axis.

CPU path (the one implemented): all-gather dispatch. Inside one ``jax.shard_map``
  1. all_gather the token shards (and their expert ids) over the axis    h [N/M, D] -> [N, D]
  2. each device runs its E/M local experts on the tokens routed to them (the local dispatcher; tokens
     of other devices' experts get no rows and contribute zeros)
  3. psum_scatter the partial outputs back to token shards              [N, D] -> [N/M, D]
Every token's expert lives on exactly one device, so the sum is exact and nothing is dropped. Traffic is
O(N D) per device each way, like a fixed-capacity all_to_all at capacity N/M x M. On GPU/TPU a
``ragged_all_to_all`` dispatch would move only the routed rows; CPU does not implement it.

Dimension names: B batch, T time, D model, E experts, M devices on the axis, El = E / M local experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from readme_jax.model import moe
from readme_jax.model.dispatch import Dispatcher


def expert_parallel_moe_ffn(expert_ids: jnp.ndarray, h: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray,
                            w_down: jnp.ndarray, *, mesh: jax.sharding.Mesh, axis: str = "expert",
                            dispatcher: Dispatcher | None = None) -> jnp.ndarray:
    """Top-1 MoE FFN with experts sharded over ``axis``. Same result as ``moe.moe_ffn``.

    expert_ids <int32>[B, T] and h [B, T, D]: sharded over ``axis`` on B (B divisible by M).
    w_gate/w_up [E, D, Fe], w_down [E, Fe, D]: sharded over ``axis`` on E (E divisible by M).
    dispatcher: the local kernel (default: ``dispatch.default_dispatcher`` of the gathered token count).
    Returns [B, T, D] sharded like h.
    """
    M = mesh.shape[axis]
    E = w_gate.shape[0]
    if E % M or h.shape[0] % M:
        raise ValueError(f"expert_parallel_moe_ffn: experts ({E}) and batch ({h.shape[0]}) must be divisible by "
                         f"the '{axis}' axis size ({M})")
    local_experts = E // M

    def local(ids, h, wg, wu, wd):
        with jax.named_scope("ep_dispatch"):
            ids_all = jax.lax.all_gather(ids, axis, tiled=True)                       # [B, T]
            h_all = jax.lax.all_gather(h, axis, tiled=True)                           # [B, T, D]
            first = jax.lax.axis_index(axis) * local_experts
            # ids of other devices' experts fall outside [0, El): the plan gives those tokens no rows
            plan = moe.plan_dispatch(ids_all - first, local_experts, dispatcher=dispatcher)
        y = moe.moe_ffn(plan, h_all, wg, wu, wd)                           # zeros off-device
        with jax.named_scope("ep_combine"):
            return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)    # [B/M, T, D]

    spec = P(axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, spec), out_specs=spec)(
        expert_ids, h, w_gate, w_up, w_down)
