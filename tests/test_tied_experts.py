"""Tied experts: one weight per channel (channel tables + each expert's channel list), gathered per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.extract.experts import readme_from_dense
from readme_jax.extract.masks import build_masks
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import positions_from_mask, run_layers
from readme_jax.model.layers import swiglu_hidden
from readme_jax.model.llama import Llama
from readme_jax.model.router import RouterConfig
from readme_jax.parallel import sharding
from readme_jax.parallel.mesh import make_mesh
from tests.tiny_models import random_model

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, max_position_embeddings=64)
E = 3
RCFG = RouterConfig(vocab_size=64, dim=16, n_heads=2, mlp_dim=16, num_experts=E, embed_rank=8)


@pytest.fixture(scope="module")
def setup():
    dense = random_model(lambda rngs: Llama(CFG, rngs=rngs))
    masks = build_masks(np.random.default_rng(4).random((E, CFG.num_layers, CFG.intermediate_size)), 0.5)
    tied = readme_from_dense(dense, masks, RCFG, rngs=nnx.Rngs(5), tied=True)
    fused = readme_from_dense(dense, masks, RCFG, rngs=nnx.Rngs(5))
    return dense, masks, tied, fused


def _masked_dense_logits(dense, masks, ids, expert_ids):
    keep = jnp.swapaxes(jnp.asarray(masks.domain, jnp.float32), 0, 1)                 # [L, E, F]

    def ffn(p, h):
        act = swiglu_hidden(h, p["w_gate"], p["w_up"])
        return (act * p["keep"][expert_ids]) @ p["w_down"], None

    mask = jnp.ones(ids.shape, bool)
    x, _, _ = run_layers({**dense.layer_arrays(), "keep": keep}, dense.tok.encode(ids),
                         positions=positions_from_mask(mask), attention_mask_=mask, cfg=CFG, ffn_fn=ffn)
    return dense.tok.decode(x)


def test_tied_forward_equals_masked_dense(setup):
    dense, masks, tied, fused = setup
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    expert_ids = jnp.asarray(rng.integers(0, E, (2, 9)), jnp.int32)
    want = _masked_dense_logits(dense, masks, ids, expert_ids)
    got = jax.jit(lambda ids, e: tied(ids, expert_ids=e))(ids, expert_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # the materialised (serving / export) layout is the fused one, and gives the same logits
    untied = tied.untied()
    assert not untied.tied and untied.experts.w_gate.shape == fused.experts.w_gate.shape
    np.testing.assert_array_equal(np.asarray(untied.experts.w_down[...]), np.asarray(fused.experts.w_down[...]))
    np.testing.assert_allclose(np.asarray(untied(ids, expert_ids=expert_ids)), np.asarray(want), atol=1e-5)
    # decode layers (per-expert split of the decode dispatcher) are made from the gathered layout
    layers = tied.decode_layers(1)
    assert len(layers[0]["w_gate"]) == E and "channels" not in layers[0]
    # one weight per channel: E x Fe expert columns per layer become F table columns
    L, D, Fe, F = CFG.num_layers, CFG.hidden_size, masks.expert_dim, CFG.intermediate_size
    assert fused.num_params() - tied.num_params() == 3 * L * D * (E * Fe - F)
    assert tied.active_params() == fused.active_params()


@pytest.mark.slow(reason="compiles the tied expert train step and a gradient step (31 s here)")
def test_shared_channel_learns_from_every_expert(setup):
    """A shared channel's table gradient is the sum over experts of the fused copies' gradients, and each
    expert's tokens contribute to it."""
    _, masks, tied, fused = setup
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 64, (E, 8)), jnp.int32)
    expert_ids = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[:, None], ids.shape)   # row e -> expert e

    def grads(model):
        gd, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("experts")), ...)
        loss = lambda p: jnp.sum(nnx.merge(gd, p, rest).token_nll(ids, jnp.roll(ids, -1, 1), expert_ids=expert_ids))
        return nnx.to_pure_dict(jax.grad(loss)(params))["experts"]

    gt, gf = grads(tied), grads(fused)
    chan = masks.expert_channels()                                                     # [L, E, Fe]
    l = 0
    shared = np.flatnonzero(masks.shared[l])
    assert shared.size
    c = int(shared[0])
    per_expert = [np.asarray(gf["w_up"][l, e][:, list(chan[l, e]).index(c)]) for e in range(E)]
    assert all(np.abs(g).max() > 0 for g in per_expert)                               # every expert's tokens
    np.testing.assert_allclose(np.asarray(gt["w_up"][l][:, c]), sum(per_expert), rtol=1e-4, atol=1e-7)
    # a channel no domain keeps gets no gradient
    unused = np.flatnonzero(~masks.domain[:, l].any(0))
    if unused.size:
        assert float(jnp.abs(gt["w_up"][l][:, unused]).max()) == 0.0


def test_tied_tables_shard_by_the_rule_table(setup):
    _, _, tied, _ = setup
    mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 1}, devices=jax.devices()[:2])
    sh = sharding.param_shardings(nnx.state(tied), mesh)["experts"]
    assert sh["w_gate"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)        # [L, D, F]: D over fsdp
    assert sh["w_down"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")        # [L, F, D]
    assert sh["channels"].spec == jax.sharding.PartitionSpec(None, None, None)
