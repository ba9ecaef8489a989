"""Train steps on a (data, fsdp, expert) mesh of the 8 simulated CPU devices: the same loss, metrics and
updated params as the single-device step on the same batch (a ragged loss mask included: the loss is a
token-weighted mean, not a mean of per-device means; gradient accumulation over 2 micro-batches), params
and optimizer state really sharded by the rule table, and mesh / batch errors that name the problem."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.parallel.mesh import make_mesh, shard_batch
from readme_jax.train import losses, steps
from readme_jax.train.optim import make_optimizer

MESHES = [dict(data=2, fsdp=2, expert=2)]   # E = 3 on expert = 2: 2 slots per device, one empty


def _tiny_readme():
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.extract.masks import build_masks
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from readme_jax.model.router import RouterConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    dense = Llama(cfg, rngs=nnx.Rngs(0))
    masks = build_masks(np.random.default_rng(1).random((3, 2, 40)).astype(np.float32), 0.5)
    rcfg = RouterConfig(vocab_size=64, num_experts=3, dim=16, n_heads=2, mlp_dim=32, embed_rank=8)
    return dense, masks, readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(2))


def _run(make, model, kind, batch, mesh):
    gd, tr, frozen = steps.split_for(model, kind)
    tr = jax.tree.map(jnp.copy, tr)          # the step donates its trainable state; keep the model's arrays
    tx = make_optimizer(1.0, 4)
    sh = steps.StepShardings.of(tr, frozen, tx, mesh)
    tr, frozen = jax.device_put(tr, sh.trainable), jax.device_put(frozen, sh.frozen)
    opt = sh.init_opt_state(tx, tr)
    step = make(gd, tx, sh)
    new_tr, new_opt, metrics = step(tr, opt, frozen, shard_batch(batch, mesh, axis=1), jnp.float32(1e-2))
    assert all(x.is_deleted() for x in jax.tree.leaves((tr, opt)))     # donated: updated in place
    if mesh.size > 1:                       # the rule table's shardings, kept by the update
        chex.assert_equal(jax.tree.map(lambda x: x.sharding.spec, new_tr),
                          jax.tree.map(lambda s: s.spec, sh.trainable))
        assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(new_opt)
                   if x.ndim), "optimizer state is not sharded"
    host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    return jax.device_get(new_tr), host


def _same(a, b):
    ta, ma = a
    tb, mb = b
    keys = [k for k in ma if k not in ("capacity", "padding_rows")]
    chex.assert_trees_all_close({k: ma[k] for k in keys}, {k: mb[k] for k in keys}, rtol=2e-5, atol=1e-6)
    # params after one Adam update of lr 1e-2: Adam divides by |g|, so a float-order change in a near-zero
    # gradient entry moves it by up to ~1e-5, a thousandth of the update itself
    chex.assert_trees_all_close(ta, tb, rtol=0, atol=3e-5)


@pytest.mark.slow(reason="compiles sharded steps on the 8-device mesh")
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_expert_step_on_a_mesh_matches_one_device(sizes):
    dense, masks, model = _tiny_readme()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 64, size=(16, 16)).astype(np.int32)
    mask = np.ones((16, 16), np.float32)
    mask[1, 5:] = 0
    mask[6, :3] = 0                           # unequal token counts per device
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask}
    batch = {k: steps.microbatches(v, 2) for k, v in batch.items()}              # A=2 micro-batches of 8
    make = lambda gd, tx, sh: steps.ExpertStep(gd, tx, sh, num_experts=3)
    one = _run(make, model, "expert", batch, make_mesh())
    got = _run(make, model, "expert", batch, make_mesh(sizes))
    assert got[1]["dropped"] == 0 and got[1]["padding_rows"] >= 0
    _same(one, got)


@pytest.mark.slow(reason="compiles sharded steps on the 8-device mesh")
def test_router_step_on_a_mesh_matches_one_device():
    dense, masks, model = _tiny_readme()
    ids = np.random.default_rng(4).integers(0, 64, size=(8, 16)).astype(np.int32)
    dist = np.asarray(jnp.swapaxes(losses.router_targets(dense, jnp.asarray(ids), None,
                                                          jnp.asarray(masks.specific)), 0, 1))   # [B, L, T, E]
    batch = {"input_ids": steps.microbatches(ids, 1), "dist": steps.microbatches(dist, 1)}
    make = lambda gd, tx, sh: steps.make_router_step(gd, tx, sh)
    _same(_run(make, model, "router", batch, make_mesh()),
          _run(make, model, "router", batch, make_mesh(dict(data=2, fsdp=2, expert=2))))


def test_mesh_and_batch_errors():
    assert make_mesh().size == 1
    assert make_mesh(dict(fsdp=-1, expert=2)).shape["fsdp"] == len(jax.devices()) // 2
    with pytest.raises(ValueError, match=r"needs 99 devices, 8 visible"):
        make_mesh(dict(data=99))
    with pytest.raises(ValueError, match=r"-1: 8 devices are not a multiple of the other axes' product 3"):
        make_mesh(dict(data=-1, fsdp=3))
    with pytest.raises(ValueError, match=r"batch dimension 1 of shape \(1, 6, 4\) is not divisible by the 8"):
        shard_batch(np.zeros((1, 6, 4)), make_mesh(dict(expert=8)), axis=1)
