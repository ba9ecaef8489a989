"""Data-parallel train steps (readme_jax.parallel): a step on a 4-device "data" mesh (of the 8 simulated CPU
devices) gives the same loss, metrics and updated params as the single-device step on the same batch,
including a ragged loss mask (the loss is a token-weighted mean, not a mean of per-device means) and
gradient accumulation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.parallel.mesh import DATA_AXIS, make_mesh, shard_batch
from readme_jax.train import losses, steps
from readme_jax.train.optim import make_optimizer


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


def _run(step, model, kind, batch, mesh):
    gd, tr, frozen = steps.split_for(model, kind)
    tr = jax.tree.map(jnp.copy, tr)          # the step donates its trainable state; keep the model's arrays
    tx = make_optimizer(1.0, 4)
    tr, opt, frozen = replicate((tr, tx.init(tr), frozen), mesh)
    new_tr, _, metrics = step(gd, tx, mesh)(tr, opt, frozen, shard_batch(batch, mesh, axis=1),
                                            replicate(jnp.float32(1e-2), mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves((tr, opt)))     # donated: updated in place
    return jax.device_get(new_tr), {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def _same(a, b):
    ta, ma = a
    tb, mb = b
    chex.assert_trees_all_close(ma, mb, rtol=2e-5, atol=1e-6)           # loss, grad / update norms, load
    # params after one Adam update of lr 1e-2: Adam divides by |g|, so a float-order change in a near-zero
    # gradient entry moves it by up to ~1e-5, a thousandth of the update itself
    chex.assert_trees_all_close(ta, tb, rtol=1e-4, atol=1e-5)


def test_expert_step_on_a_data_mesh_matches_one_device():
    _, _, model = _tiny_readme()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 64, size=(8, 16)).astype(np.int32)
    mask = np.ones(ids.shape, np.float32)
    mask[1, 5:] = 0
    mask[6, :3] = 0                           # unequal token counts per device
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask}
    batch = {k: steps.microbatches(v, 2) for k, v in batch.items()}              # A=2 micro-batches of 4
    make = lambda gd, tx, mesh: steps.make_expert_step(gd, tx, num_experts=3, mesh=mesh)
    mesh = make_mesh(4)
    assert mesh is not None and mesh.shape[DATA_AXIS] == 4
    _same(_run(make, model, "expert", batch, None), _run(make, model, "expert", batch, mesh))


def test_router_step_on_a_data_mesh_matches_one_device():
    dense, masks, model = _tiny_readme()
    ids = np.random.default_rng(4).integers(0, 64, size=(8, 16)).astype(np.int32)
    dist = np.asarray(jnp.swapaxes(losses.router_targets(dense, jnp.asarray(ids), None,
                                                          jnp.asarray(masks.specific)), 0, 1))   # [B, L, T, E]
    batch = {"input_ids": steps.microbatches(ids, 1), "dist": steps.microbatches(dist, 1)}
    make = lambda gd, tx, mesh: steps.make_router_step(gd, tx, mesh=mesh)
    _same(_run(make, model, "router", batch, None), _run(make, model, "router", batch, make_mesh(8)))


def test_mesh_and_batch_errors():
    assert make_mesh(1) is None
    assert make_mesh(-1).shape[DATA_AXIS] == len(jax.devices())
    with pytest.raises(ValueError, match=r"mesh.data=99: need between 1 and 8 devices"):
        make_mesh(99)
    with pytest.raises(ValueError, match=r"batch dimension 1 of shape \(1, 6, 4\) is not divisible by the 4"):
        shard_batch(np.zeros((1, 6, 4)), make_mesh(4), axis=1)
