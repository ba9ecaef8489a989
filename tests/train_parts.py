"""Small random parts for the training tests: expert masks and a 2-layer dense Llama."""

from __future__ import annotations

import numpy as np
from flax import nnx


def random_masks(E, L, F, keep, seed=0):
    """ExpertMasks of random scores <float32>[E, L, F] at keep ratio ``keep``."""
    from readme_jax.extract.masks import build_masks
    scores = np.random.default_rng(seed).random((E, L, F)).astype(np.float32)
    return build_masks(scores, keep)


def tiny_dense(seed=0):
    """A random 2-layer Llama (vocab 64, D 16, F 40)."""
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    return Llama(cfg, rngs=nnx.Rngs(seed))
