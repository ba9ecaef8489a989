"""Tiny random NNX models without per-shape RNG compiles: build abstractly, fill from NumPy; the one tiny dense
and the one tiny Read-ME config that modules share (session fixtures ``tiny_dense`` / ``tiny_readme`` in
tests/conftest.py), so that their compiled steps are shared too.

Eagerly initialising a model runs one ``jax.random`` program per parameter shape, each compiled on first
use; on a busy CPU that costs seconds per test module. Norm scales (names ending in ``norm``) are ones,
every other parameter is N(0, std^2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.model.config import LlamaConfig
from readme_jax.model.readme import ReadMeConfig
from readme_jax.model.router import RouterConfig

TINY_DENSE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=256)
TINY_READ_ME = ReadMeConfig(
    base=LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=128),
    num_experts=3, expert_dim=12,
    router=RouterConfig(vocab_size=40, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=4, max_len=128))


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


@functools.partial(jax.jit, static_argnums=0)                  # graphdef static: one compile per model config
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def greedy_by_recompute(model, prompts, n: int, *, length: int = 64, rows: int = 4) -> list[list[int]]:
    """The greedy continuation (n tokens) of each prompt by full recomputation, no KV cache: per new token one
    call of a jitted forward on right-padded rows [rows, length] (one compile per model config for every
    prefix, prompt and call; causal attention: the padding after a row's tokens never changes their logits)."""
    seqs = [list(p) for p in prompts]
    if len(seqs) > rows or max(len(r) for r in seqs) + n > length:
        raise ValueError(f"greedy_by_recompute: at most {rows} prompts of at most {length} - {n} tokens")
    graphdef, state = nnx.split(model)
    for _ in range(n):
        ids = np.zeros((rows, length), np.int32)
        for i, r in enumerate(seqs):
            ids[i, :len(r)] = r
        logits = np.asarray(_forward(graphdef, state, jnp.asarray(ids)))        # [rows, length, V]
        for i, r in enumerate(seqs):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    return [r[len(p):] for r, p in zip(seqs, prompts)]


def random_tied_readme(cfg: ReadMeConfig, *, seed: int = 0, std: float = 0.02, overrides: dict | None = None):
    """A random Read-ME with tied experts (``ReadMe(..., tied=True)``): random channel tables, and each
    expert's channels a random sorted subset of expert_dim of the F channels (the subsets overlap)."""
    from readme_jax.model.readme import ExpertChannels, ReadMe
    model = random_model(lambda rngs: ReadMe(cfg, rngs=rngs, tied=True), seed=seed, std=std, overrides=overrides)
    rng = np.random.default_rng(seed + 1)
    L, E, F, Fe = cfg.base.num_layers, cfg.num_experts, cfg.base.intermediate_size, cfg.expert_dim
    channels = [[np.sort(rng.choice(F, Fe, replace=False)) for _ in range(E)] for _ in range(L)]
    model.experts.channels = ExpertChannels(jnp.asarray(np.array(channels), jnp.int32))
    return model
