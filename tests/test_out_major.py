"""Out-major projection weights (model/layers.py): the same products as the in-major ones, in every form."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model.decoder import PROJECTIONS, unstack_layers
from readme_jax.model.dispatch.decode import split_experts
from readme_jax.model.layers import OUT_MAJOR_MAX_OUTPUT, OutMajor, matmul_out_major, swiglu, swiglu_hidden


@pytest.mark.parametrize("rows", [1, 2, 8, 33, 300])
def test_matmul_out_major_equals_the_in_major_product(rows):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    want = x @ w
    chex.assert_trees_all_close(matmul_out_major(x, w.T), want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(matmul_out_major)(x, jnp.transpose(w)), want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(x @ OutMajor.of(w), want, rtol=1e-5, atol=1e-5)     # through __rmatmul__


def test_matmul_out_major_keeps_leading_dims_and_takes_the_plain_form_past_its_limit():
    x = jnp.ones((2, 3, 8), jnp.float32)
    w_t = jnp.ones((5, 8), jnp.float32)
    chex.assert_shape(matmul_out_major(x, w_t), (2, 3, 5))
    big = jnp.ones((OUT_MAJOR_MAX_OUTPUT // 4 + 1, 8), jnp.float32)              # rows x out over the limit
    hlo = jax.jit(matmul_out_major).lower(big, jnp.ones((4, 8), jnp.float32)).as_text()
    assert "optimization_barrier" not in hlo
    assert "optimization_barrier" in jax.jit(matmul_out_major).lower(x, w_t).as_text()


def test_out_major_is_a_pytree_with_the_logical_shape():
    w = OutMajor.of(jnp.arange(6.0).reshape(2, 3))
    assert w.shape == (2, 3) and w.t.shape == (3, 2) and w.size == 6 and w.nbytes == 24
    assert w.astype(jnp.bfloat16).dtype == jnp.bfloat16
    doubled = jax.jit(lambda w: jax.tree.map(lambda a: 2 * a, w))(w)
    assert isinstance(doubled, OutMajor)
    chex.assert_trees_all_close(doubled.t, 2 * w.t)


def test_unstack_layers_holds_projections_out_major_and_the_rest_as_they_are():
    L, D, F = 2, 4, 6
    stacked = {"attn_norm": jnp.ones((L, D)), "wq": jnp.arange(L * D * D, dtype=jnp.float32).reshape(L, D, D),
               "w_gate": jnp.ones((L, D, F)), "w_down": jnp.ones((L, F, D))}
    layers = unstack_layers(stacked)
    assert len(layers) == L
    for i, p in enumerate(layers):
        assert set(p) == set(stacked)
        for k in PROJECTIONS & set(p):
            assert isinstance(p[k], OutMajor) and p[k].shape == stacked[k].shape[1:]
        chex.assert_trees_all_equal(p["wq"].t, stacked["wq"][i].T)
        chex.assert_trees_all_equal(p["attn_norm"], stacked["attn_norm"][i])
    tied = unstack_layers({**stacked, "channels": jnp.zeros((L, 3, 2), jnp.int32)})   # gathered per call
    assert not isinstance(tied[0]["w_gate"], OutMajor)


def test_split_experts_gives_one_out_major_weight_per_expert():
    layer = {"wq": jnp.ones((4, 4)), "w_gate": jnp.arange(3 * 4 * 5, dtype=jnp.float32).reshape(3, 4, 5)}
    split = split_experts(layer)
    assert len(split["w_gate"]) == 3 and split["wq"] is layer["wq"]
    for e, w in enumerate(split["w_gate"]):
        assert isinstance(w, OutMajor)
        chex.assert_trees_all_equal(w.t, layer["w_gate"][e].T)


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_swiglu_out_major_equals_the_in_major_ffn(rows):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((16, 24)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((24, 16)), jnp.float32)
    want = swiglu_hidden(x, wg, wu) @ wd
    chex.assert_trees_all_close(swiglu(x, wg, wu, wd), want, rtol=1e-5, atol=1e-5)
    got = jax.jit(swiglu)(x, *map(OutMajor.of, (wg, wu, wd)))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
