"""The masked kernel (tied experts as channel tables, each token's channels masked to its expert's): equal to
the per-expert kernels and the masked-dense oracle; tied exports keep their tables and reload."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import readme_jax
from readme_jax.convert.readme_checkpoint import save_readme
from readme_jax.model import dispatch, moe
from readme_jax.model.decoder import unstack_layers
from readme_jax.model.dispatch.masked import channel_mask
from tests.tiny_models import TINY_READ_ME, random_model, random_tied_readme

CFG = TINY_READ_ME
E, F, Fe = CFG.num_experts, CFG.base.intermediate_size, CFG.expert_dim


@pytest.fixture(scope="module")
def tied():
    return random_tied_readme(CFG, seed=3, std=0.3)


def test_channel_mask_marks_each_experts_channels():
    channels = jnp.asarray([[0, 2], [2, 3], [1, 3]], jnp.int32)
    want = np.zeros((4, 3), np.float32)
    for e, cs in enumerate([[0, 2], [2, 3], [1, 3]]):
        want[cs, e] = 1
    np.testing.assert_array_equal(np.asarray(channel_mask(channels, 4, jnp.float32)), want)


@pytest.mark.parametrize("rows", [1, 8])                     # 1: the plain form; 8: the transposed form on CPU
def test_masked_kernel_equals_the_oracle_and_grouped(tied, rows):
    """Every row (ids outside [0, E) included: output 0) through its expert, as the per-expert oracle and the
    grouped kernel on the gathered experts compute it."""
    rng = np.random.default_rng(rows)
    h = jnp.asarray(rng.standard_normal((rows, CFG.base.hidden_size)), jnp.float32)
    ids = jnp.asarray(rng.integers(-1, E + 1, rows), jnp.int32)
    raw = unstack_layers(tied.layer_arrays())[1]
    masked, grouped = dispatch.get("masked"), dispatch.get("grouped")
    fused = moe.fused_layer(raw)

    @jax.jit
    def run(h, ids):
        got = moe.moe_ffn_fn(moe.plan_dispatch(ids, E, dispatcher=masked))(masked.prepare_layer(raw), h)[0]
        ref = moe.reference_moe_ffn(jnp.where(ids < E, ids, -1), h, fused["w_gate"], fused["w_up"], fused["w_down"])
        grp = moe.moe_ffn_fn(moe.plan_dispatch(ids, E, dispatcher=grouped))(grouped.prepare_layer(fused), h)[0]
        return got, ref, grp
    got, ref, grp = run(h, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(grp), atol=1e-5, rtol=1e-5)
    out_of_range = np.flatnonzero((np.asarray(ids) < 0) | (np.asarray(ids) >= E))
    assert not np.asarray(got)[out_of_range].any()


def test_decode_layers_take_the_tables_and_fused_experts_are_refused(tied):
    layers = tied.decode_layers(dispatcher=dispatch.get("masked"))
    assert layers[0]["w_gate"].num_experts == E and layers[0]["w_up"].shape == (CFG.base.hidden_size, F)
    fused = random_model(lambda rngs: readme_jax.model.readme.ReadMe(CFG, rngs=rngs), seed=1)
    with pytest.raises(ValueError, match="needs tied experts"):
        fused.decode_layers(dispatcher=dispatch.get("masked"))
    with pytest.raises(ValueError, match="prepare_layer"):
        masked = dispatch.get("masked")
        p = moe.fused_layer(unstack_layers(tied.layer_arrays())[0])
        masked.expert_ffn(masked.plan(jnp.zeros(2, jnp.int32), E), jnp.zeros((2, 16)), p["w_gate"], p["w_up"],
                          p["w_down"])


def test_tied_backbone_with_the_masked_kernel_equals_blocked(tied):
    """The model's own call lays out a tied layer for the masked kernel (as the serving runner does once)."""
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, CFG.base.vocab_size, (2, 6)), jnp.int32)
    experts = jnp.asarray(rng.integers(-1, E, (2, 6)), jnp.int32)
    run = jax.jit(lambda i, e, d: tied.backbone(i, expert_ids=e, dispatcher=d)[0], static_argnums=2)
    np.testing.assert_allclose(np.asarray(run(ids, experts, dispatch.get("masked"))),
                               np.asarray(run(ids, experts, dispatch.get("blocked"))), atol=1e-5, rtol=1e-5)


def test_tied_export_keeps_the_tables_and_reloads(tied, tmp_path):
    out = save_readme(tied, tmp_path / "tied")
    assert json.loads((out / "config.json").read_text())["tied"] is True
    back, _ = readme_jax.load_pretrained(out)
    assert back.tied and back.config == CFG
    np.testing.assert_array_equal(np.asarray(back.experts.channels[...]), np.asarray(tied.experts.channels[...]))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.base.vocab_size, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(tied(ids)))
    fused = save_readme(tied.untied(), tmp_path / "fused")           # an untied export reloads untied
    again, _ = readme_jax.load_pretrained(fused)
    assert not again.tied
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(tied(ids)), atol=1e-5)
