"""The pre-gating router: size, causality, incremental decode == full, embedding init from a backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.model.router import Router, RouterConfig
from tests.tiny_models import random_model

CFG = RouterConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, mlp_dim=24, num_experts=5, embed_rank=6,
                   max_len=32)


@pytest.fixture(scope="module")
def router():
    # larger weights than the 0.02 init so that argmax routes actually vary with the context
    return random_model(lambda rngs: Router(CFG, rngs=rngs), overrides={"embed": 0.6, "embed_proj": 0.6, "head": 0.6})


def test_param_counts():
    default = RouterConfig()
    assert default.vocab_size == 49152 and default.num_params() == 3_820_032
    abstract = nnx.eval_shape(lambda: Router(default, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 3_820_032
    table1 = RouterConfig.paper_table1()
    assert (table1.dim, table1.n_heads, table1.n_layers, table1.embed_rank) == (512, 4, 1, None)
    assert abs(table1.num_params() - 18.0e6) < 0.3e6                # paper: 18.0M
    assert nnx.eval_shape(lambda: Router(CFG, rngs=nnx.Rngs(0))).num_params() == CFG.num_params()
    with pytest.raises(ValueError, match="n_heads"):
        RouterConfig(dim=30, n_heads=4)


def test_causal(router):
    """Changing tokens after t never changes logits or routes at positions <= t (one batched call)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (2, 12)).astype(np.int32)
    cuts = (0, 5, 10)
    variants = [ids]
    for t in cuts:
        changed = ids.copy()
        changed[:, t + 1:] = rng.integers(0, 50, changed[:, t + 1:].shape)
        variants.append(changed)
    logits, routes = jax.jit(lambda x: (router(x), router.route(x)))(jnp.asarray(np.concatenate(variants)))
    logits, routes = np.asarray(logits).reshape(4, 2, 12, 5), np.asarray(routes).reshape(4, 2, 12)
    assert logits.dtype == np.float32 and routes.dtype == np.int32 and len(np.unique(routes[0])) > 1
    for i, t in enumerate(cuts, start=1):
        np.testing.assert_allclose(logits[i, :, :t + 1], logits[0, :, :t + 1], atol=1e-5)
        np.testing.assert_array_equal(routes[i, :, :t + 1], routes[0, :, :t + 1])
        assert not np.array_equal(logits[i], logits[0])


def test_incremental_equals_full_with_left_padding(router):
    rng = np.random.default_rng(1)
    T, P = 10, 4
    ids = rng.integers(0, 50, (2, T)).astype(np.int32)
    mask = np.ones((2, T), bool)
    mask[1, :3] = False                                             # row 1 is left-padded
    full = np.asarray(jax.jit(lambda x, m: router(x, attention_mask=m))(jnp.asarray(ids), jnp.asarray(mask)))

    step = jax.jit(lambda ids, m, c: router(ids, attention_mask=m, cache=c))
    cache = router.init_cache(2, 16)
    logits, cache = step(jnp.asarray(ids[:, :P]), jnp.asarray(mask[:, :P]), cache)
    outs = [np.asarray(logits)]
    for t in range(P, T):                                             # one incremental step per token
        logits, cache = step(jnp.asarray(ids[:, t:t + 1]), jnp.ones((2, 1), bool), cache)
        outs.append(np.asarray(logits))
    inc = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(inc[mask], full[mask], atol=1e-5, rtol=1e-5)
    # a left-padded row routes as the same row alone
    alone = np.asarray(jax.jit(router)(jnp.asarray(ids[1:, 3:])))
    np.testing.assert_allclose(full[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
    route = jax.jit(lambda x, m, c: router.route(x, attention_mask=m, cache=c))
    ids_inc, _ = route(jnp.asarray(ids[:, :P]), jnp.asarray(mask[:, :P]), router.init_cache(2, 16))
    np.testing.assert_array_equal(np.asarray(ids_inc)[mask[:, :P]], full[:, :P].argmax(-1)[mask[:, :P]])


def test_embedding_init_from_backbone():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 12)).astype(np.float32)
    r = random_model(lambda rngs: Router(CFG, rngs=rngs))
    r.init_embedding_from(table)
    x = np.asarray(r.embed_tokens(jnp.arange(50)[None]))[0]           # [V, Dr]
    u, s, vt = np.linalg.svd(table, full_matrices=False)
    best = (u[:, :6] * s[:6]) @ vt[:6]                                 # best rank-6 approximation
    # the projection is an isometry of the top-6 subspace: Gram matrices agree with the rank-6 table's
    np.testing.assert_allclose(x @ x.T, best @ best.T, atol=1e-3)
    full_cfg = RouterConfig(vocab_size=50, dim=8, n_heads=2, mlp_dim=8, num_experts=2, embed_rank=None)
    full = random_model(lambda rngs: Router(full_cfg, rngs=rngs))
    full.init_embedding_from(table)
    assert full.embed[...].shape == (50, 8)
    with pytest.raises(ValueError, match="vocab_size"):
        r.init_embedding_from(table[:10])
