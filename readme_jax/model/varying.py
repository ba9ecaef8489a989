"""shard_map's varying-axes types, for kernels with hand-written VJPs.

Inside ``jax.shard_map`` every value records the mesh axes it varies over. A replicated weight used with
per-device tokens (data parallelism) gets a per-device gradient, so a custom VJP's weight cotangent varies
while the weight does not, which JAX rejects; and a loop that accumulates per-device terms into zeros must
start from varying zeros. ``vary_like`` casts the weight first (``lax.pcast``), and pcast's transpose sums
the per-device gradients over the devices. Outside shard_map both helpers are the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(x) -> frozenset:
    """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary_like(w: jax.Array, ref: jax.Array) -> jax.Array:
    """``w`` cast to vary over every shard_map axis that ``ref`` varies over."""
    axes = varying_axes(ref) - varying_axes(w)
    return jax.lax.pcast(w, tuple(sorted(axes)), to="varying") if axes else w


def zeros_like_varying(w: jax.Array, dtype=None) -> jax.Array:
    """Zeros shaped like ``w`` (``dtype``, default w's) with w's varying axes: a loop carry keeps its type."""
    return vary_like(jnp.zeros(w.shape, dtype or w.dtype), w)
