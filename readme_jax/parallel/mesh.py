"""The training mesh: one "data" axis over the devices, params replicated, batches split along it.

    mesh = make_mesh(cfg.mesh.data)            # None when the axis would have one device
    params = replicate(params, mesh)           # every device holds the whole tree
    batch = shard_batch(batch, mesh, axis=1)   # numpy [A, b, ...] -> jax arrays split over b

Multi-host: every process passes the same global numpy batch (the pipelines are deterministic per seed);
``shard_batch`` builds the global array from each process's own slices (``jax.make_array_from_callback``),
so no process needs the others' data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(data: int, *, devices=None) -> jax.sharding.Mesh | None:
    """A 1-D mesh of ``data`` devices (-1: all of them) on axis "data"; None when that is one device."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if data == -1 else int(data)
    if n < 1 or n > len(devices):
        raise ValueError(f"mesh.data={data}: need between 1 and {len(devices)} devices "
                         f"({len(devices)} {devices[0].platform} device(s) visible)")
    if n == 1:
        return None
    return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n])


def replicate(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """``tree`` on every device of ``mesh`` (on the default device when there is no mesh)."""
    if mesh is None:
        return jax.device_put(tree, jax.devices()[0])
    return jax.device_put(tree, NamedSharding(mesh, P()))


def batch_spec(ndim: int, axis: int) -> P:
    return P(*([None] * axis + [DATA_AXIS] + [None] * (ndim - axis - 1)))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh | None, *, axis: int = 0) -> Any:
    """Numpy arrays -> jax arrays split over "data" along ``axis`` (whose size the mesh must divide)."""
    if mesh is None:
        return jax.device_put(batch, jax.devices()[0])
    m = mesh.shape[DATA_AXIS]

    def put(x):
        x = np.asarray(x)
        if x.shape[axis] % m:
            raise ValueError(f"batch dimension {axis} of shape {x.shape} is not divisible by the {m} devices "
                             f"of the '{DATA_AXIS}' mesh axis")
        sharding = NamedSharding(mesh, batch_spec(x.ndim, axis))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)
