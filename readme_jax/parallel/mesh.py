"""The training mesh: axes ("data", "fsdp", "expert") from ``MeshConfig``, and batches placed on it.

    mesh = make_mesh(cfg.mesh)                     # always a Mesh (1 x 1 x 1 on one device)
    batch = shard_batch(batch, mesh, axis=1)       # numpy [A, b, ...] -> jax arrays, b split over every axis

Every axis splits the rows of a batch (``BATCH_AXES``); what each axis does to the weights is the rule table
of :mod:`readme_jax.parallel.sharding`. Multi-host: every process builds the same global numpy batch (the
pipelines are deterministic per seed) and hands ``jax.make_array_from_process_local_data`` only the rows
of its own devices, so no process reads the others' data from device memory.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.config.sections import MESH_AXES, MeshConfig

DATA_AXIS, FSDP_AXIS, EXPERT_AXIS = MESH_AXES
BATCH_AXES = MESH_AXES             # rows of a batch are split over all of them


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Axis sizes (one of them -1 = the devices left) -> the sizes in MESH_AXES order; ValueError unless
    their product is between 1 and ``n_devices`` and a -1 fills a whole number of devices."""
    known = math.prod(v for v in sizes.values() if v != -1)
    shape = []
    for name in MESH_AXES:
        v = sizes.get(name, 1)
        if v == -1:
            if n_devices % known:
                raise ValueError(f"mesh.{name}=-1: {n_devices} devices are not a multiple of the other axes' "
                                 f"product {known} ({sizes})")
            v = n_devices // known
        shape.append(int(v))
    total = math.prod(shape)
    if not 1 <= total <= n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: needs {total} devices, {n_devices} visible")
    return tuple(shape)


def make_mesh(cfg: MeshConfig | dict[str, int] | None = None, *, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert) mesh of ``cfg`` (default 1 x 1 x 1) over the first devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = (cfg.sizes() if isinstance(cfg, MeshConfig) else dict(cfg or {}))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)} (expected {list(MESH_AXES)})")
    try:
        shape = mesh_shape(sizes, len(devices))
    except ValueError as e:
        raise ValueError(f"{e} ({len(devices)} {devices[0].platform} device(s) visible)") from None
    n = math.prod(shape)
    if n == len(devices) and jax.process_count() > 1:
        # hosts' devices laid out by locality; Auto axes: shardings propagate (jax.make_mesh's default is Explicit)
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                             devices=devices)
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def batch_size_of(mesh: jax.sharding.Mesh) -> int:
    """How many ways a batch's rows are split: the product of BATCH_AXES' sizes (= the devices)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_spec(ndim: int, axis: int) -> P:
    """Rows (dimension ``axis`` of an ``ndim`` array) split over every batch axis, the rest replicated."""
    return P(*([None] * axis + [BATCH_AXES] + [None] * (ndim - axis - 1)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: jax.sharding.Mesh, *, axis: int = 0) -> Any:
    """Global numpy arrays -> jax arrays with dimension ``axis`` split over BATCH_AXES (it must divide)."""
    m = batch_size_of(mesh)

    def put(x):
        x = np.asarray(x)
        if x.shape[axis] % m:
            raise ValueError(f"batch dimension {axis} of shape {x.shape} is not divisible by the {m} devices "
                             f"of the mesh {dict(mesh.shape)}")
        sharding = NamedSharding(mesh, batch_spec(x.ndim, axis))
        return jax.make_array_from_process_local_data(sharding, _local_rows(x, sharding, axis), x.shape)

    return jax.tree.map(put, batch)


def _local_rows(x: np.ndarray, sharding: NamedSharding, axis: int) -> np.ndarray:
    """The contiguous block of ``x`` along ``axis`` that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(x.shape).values()
    starts = [s[axis].start or 0 for s in idx]
    stops = [x.shape[axis] if s[axis].stop is None else s[axis].stop for s in idx]
    lo, hi = min(starts), max(stops)
    return x[(slice(None),) * axis + (slice(lo, hi),)]
