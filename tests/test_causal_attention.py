"""Blocked causal attention (model/causal_attention.py) against ``layers.gqa_attention`` under the equivalent
mask: outputs and the hand-written backward's gradients, with left padding, a sliding window, a length that
is not a multiple of the block, and bf16 inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model.causal_attention import causal_attention
from readme_jax.model.layers import attention_mask, gqa_attention

B, H, K, HD = 2, 6, 2, 16


def _inputs(T, dtype, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal((B, T, n, HD)), dtype) for n in (H, K, K))
    key_mask = np.ones((B, T), bool)
    key_mask[1, :5] = False                      # row 1 left-padded by 5
    return q, k, v, jnp.asarray(key_mask), jnp.asarray(r.standard_normal((B, T, H, HD)), jnp.float32)


def _both(T, window, block, dtype):
    q, k, v, key_mask, w = _inputs(T, dtype)
    full = lambda q, k, v: gqa_attention(q, k, v, attention_mask(jnp.arange(T), key_mask, window))
    ours = lambda q, k, v: causal_attention(q, k, v, key_mask, window, block)
    # the loss reads only the rows that see a key (padding queries' outputs are never used)
    seen = key_mask[:, :, None, None].astype(jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w * seen)
    grads = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    return (jax.jit(full)(q, k, v), jax.jit(ours)(q, k, v)), (grads(full), grads(ours)), seen


@pytest.mark.parametrize("T, window, block", [(64, None, 16), (50, None, 16), (64, 20, 16), (37, 9, 8),
                                              (24, None, 128)])
def test_matches_full_attention(T, window, block):
    (want, got), (g_want, g_got), seen = _both(T, window, block, jnp.float32)
    chex.assert_trees_all_close(got * seen, want * seen, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(g_got, g_want, atol=5e-5, rtol=5e-5)


def test_bf16_inputs_keep_their_dtype():
    (want, got), (g_want, g_got), seen = _both(48, None, 16, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g_got)
    chex.assert_trees_all_close(got.astype(jnp.float32) * seen, want.astype(jnp.float32) * seen, atol=3e-2,
                                rtol=3e-2)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), g_got),
                                jax.tree.map(lambda a: a.astype(jnp.float32), g_want), atol=6e-2, rtol=6e-2)
