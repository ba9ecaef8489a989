"""Tiny random NNX models without per-shape RNG compiles: build abstractly, fill from NumPy.

Eagerly initialising a model runs one ``jax.random`` program per parameter shape, each compiled on first
use; on a busy CPU that costs seconds per test module. Norm scales (names ending in ``norm``) are ones,
every other parameter is N(0, std^2).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_model(make, *, seed: int = 0, std: float = 0.02, overrides: dict | None = None):
    """``make(rngs) -> module``; returns it with fresh NumPy-random params.

    ``overrides``: dotted parameter path (or a suffix of it, e.g. "router.head") -> std."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    overrides = overrides or {}

    def fill(path, leaf):
        dotted = ".".join(str(getattr(k, "key", k)) for k in path)
        if dotted.endswith("norm"):
            return jnp.ones(leaf.shape, leaf.dtype)
        scale = next((v for k, v in overrides.items() if dotted == k or dotted.endswith("." + k)), std)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
