"""Data-parallel value-and-grad: each device runs the loss on its slice of the batch, inside one
``jax.shard_map`` over the "data" axis, with the params replicated.

Why a shard_map and not plain ``jax.jit`` sharding propagation: the MoE FFN's dispatch (sort tokens by
expert, grouped matmul, unsort) is data-dependent gathers and loops that XLA's partitioner would replicate;
inside the shard_map each device plans and runs its own tokens, and nothing crosses devices but the
gradient sum.

Exactness: the loss is a weighted mean (e.g. NLL over ``loss_mask``), so a device's share of the global
loss is ``loss_d * w_d / sum(w)``. The gradient of that share w.r.t. replicated params is summed over the
devices by shard_map itself (the transpose of replicating a param), giving exactly the gradient of the
global weighted mean. Metrics (``aux``) are averaged over devices with equal weights.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from readme_jax.parallel.mesh import DATA_AXIS

# loss_fn(trainable, frozen, batch) -> (loss <f32>[], weight <f32>[], aux pytree)
LossFn = Callable[[Any, Any, Any], tuple[jax.Array, jax.Array, Any]]


def value_and_grad(loss_fn: LossFn, *, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """``f(trainable, frozen, batch) -> ((loss, aux), grads)`` of ``loss_fn`` over the whole batch.

    Without a mesh: ``jax.value_and_grad`` of ``loss_fn`` (weight unused). With one: ``batch`` leaves are
    split over "data" on their leading axis; loss and grads are those of the global weighted mean.
    """
    def local(trainable, frozen, batch):
        def share(tr):
            loss, weight, aux = loss_fn(tr, frozen, batch)
            if mesh is not None:   # this device's share of the global weighted mean
                loss = loss * jax.lax.stop_gradient(weight / jax.lax.psum(weight, DATA_AXIS))
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(share, has_aux=True)(trainable)
        if mesh is not None:
            loss, aux = jax.lax.psum(loss, DATA_AXIS), jax.lax.pmean(aux, DATA_AXIS)
        return (loss, aux), grads

    if mesh is None:
        return local
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)), out_specs=((P(), P()), P()))
