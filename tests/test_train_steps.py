"""Train steps and checkpoints: each phase kind updates only its own partition (and its loss is the loss of
that partition), a diverged update is refused, a checkpoint save is atomic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.errors import CheckpointError
from readme_jax.parallel.mesh import make_mesh
from readme_jax.train import losses
from tests.train_parts import random_masks, tiny_dense


@pytest.mark.slow(reason="compiles a router step and an expert step of the tiny Read-ME (32 s here)")
def test_router_step_freezes_backbone_and_expert_step_freezes_router():
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.model.router import RouterConfig
    from readme_jax.train import steps
    from readme_jax.train.optim import make_optimizer

    dense = tiny_dense()
    masks = random_masks(3, 2, 40, 0.5, seed=4)
    rcfg = RouterConfig(vocab_size=64, num_experts=3, dim=16, n_heads=2, mlp_dim=32, embed_rank=8)
    model = readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 64, size=(4, 32)), jnp.int32)
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    dist = losses.router_targets(dense, ids, None, jnp.asarray(masks.specific))          # [L, B, T, E]

    # router step (grad_accum=2) on precomputed targets: only the router changes, and its loss is the
    # distillation loss of (router logits, dist)
    gd, tr, frozen = steps.split_for(model, "router")
    tx = make_optimizer(1.0, 4)
    one = make_mesh()
    step = steps.make_router_step(gd, tx, steps.StepShardings.of(tr, frozen, tx, one))
    micro = {"input_ids": steps.microbatches(ids, 2), "dist": steps.microbatches(jnp.swapaxes(dist, 0, 1), 2)}
    new_tr, _, m = step(tr, tx.init(tr), frozen, micro, jnp.float32(1e-2))
    host = steps.check_finite(m, phase="router_0", step=1)
    want = [float(losses.distill_loss(model.router(ids[i:i + 2]), dist[:, i:i + 2], jnp.ones((2, 32))))
            for i in (0, 2)]
    np.testing.assert_allclose(host["loss"], np.mean(want), rtol=1e-5)
    nnx.update(model, new_tr)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for k in ("tok", "attn", "experts"):
        jax.tree.map(np.testing.assert_array_equal, before[k], after[k])
    assert not np.array_equal(before["router"]["head"], after["router"]["head"])

    # expert step: the router stays bitwise, the backbone moves
    gd, tr, frozen = steps.split_for(model, "expert")
    step = steps.ExpertStep(gd, tx, steps.StepShardings.of(tr, frozen, tx, one), num_experts=3)
    batch = {k: steps.microbatches(v, 1) for k, v in batch.items()}
    spare = jax.tree.map(jnp.copy, tr)                 # the step donates (consumes) its trainable state
    new_tr, _, m = step(tr, tx.init(tr), frozen, batch, jnp.float32(1e-2))
    assert m["dropped"] == 0 and m["capacity"] == 4 * 32   # one device: capacity = its tokens, no padding
    host = steps.check_finite(m, phase="expert_0", step=1)
    assert abs(sum(host["load"]) - 1.0) < 1e-6
    nnx.update(model, new_tr)
    final = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, after["router"], final["router"])
    assert not np.array_equal(after["experts"]["w_up"], final["experts"]["w_up"])

    # a diverged update is refused with a clear message
    _, _, m = step(spare, tx.init(spare), frozen, batch, jnp.float32(np.inf))
    with pytest.raises(steps.TrainingDivergedError, match=r"expert_0, step 3: non-finite update_norm"):
        steps.check_finite(m, phase="expert_0", step=3)


def test_checkpoint_save_is_atomic_and_tmp_dirs_are_ignored(tmp_path):
    from readme_jax.train.checkpointing import PhaseCheckpoints, remove_tmp_dirs
    params = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2))}}
    ck = PhaseCheckpoints(tmp_path / "router_0")
    ck.save(2, params, {"n": jnp.int32(3)}, {"done": False, "data_state": {"i": 1}})
    assert sorted(p.name for p in (tmp_path / "router_0").iterdir()) == ["2"]
    # a save killed half-way leaves only an orbax tmp folder: never the latest step
    (tmp_path / "router_0" / "4.orbax-checkpoint-tmp-123").mkdir()
    ck2 = PhaseCheckpoints(tmp_path / "router_0")
    assert ck2.latest_step() == 2
    got, opt, meta = ck2.restore(params, {"n": jnp.int32(0)})
    np.testing.assert_array_equal(got["b"]["c"], params["b"]["c"])
    assert int(opt["n"]) == 3 and meta["data_state"] == {"i": 1} and meta["step"] == 2
    assert [p.name for p in remove_tmp_dirs(tmp_path / "router_0")] == ["4.orbax-checkpoint-tmp-123"]
    with pytest.raises(CheckpointError, match="cannot restore .*do not match"):
        ck2.restore({"a": jnp.arange(4.0), "z": jnp.ones(1)})


def test_phase_done_reads_the_latest_meta_and_creates_nothing(tmp_path):
    from readme_jax.train.checkpointing import PhaseCheckpoints, phase_done
    assert not phase_done(tmp_path / "expert_0") and not (tmp_path / "expert_0").exists()
    ck = PhaseCheckpoints(tmp_path / "expert_0")
    params = {"a": jnp.zeros(2)}
    ck.save(2, params, params, {"done": False})
    assert not phase_done(tmp_path / "expert_0")
    ck.save(4, params, params, {"done": True})
    assert phase_done(tmp_path / "expert_0")


@pytest.mark.slow(reason="compiles a distillation expert step of the tiny Read-ME")
def test_distillation_expert_step_loss_is_the_mix_of_ce_and_kl_of_the_full_logits():
    """train.expert_loss=mix: the step's loss (its gradient computed in the head loss's forward) equals
    (1 - w) CE + w T^2 KL(parent || student) from the two models' full logits, and the backbone moves."""
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.model.router import RouterConfig
    from readme_jax.train import steps
    from readme_jax.train.optim import make_optimizer

    dense = tiny_dense()
    rcfg = RouterConfig(vocab_size=64, num_experts=3, dim=16, n_heads=2, mlp_dim=32, embed_rank=8)
    model = readme_from_dense(dense, random_masks(3, 2, 40, 0.5, seed=4), rcfg, rngs=nnx.Rngs(0))
    dense = tiny_dense(seed=1)                     # a teacher far from the student: a KL well above rounding
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 64, size=(2, 16)), jnp.int32)
    mask = jnp.ones(ids.shape, jnp.float32).at[1, 10:].set(0.0)
    targets = jnp.roll(ids, -1, 1)
    w, tau = 0.4, 2.0
    logq = jax.nn.log_softmax(model(ids) / tau)              # the step routes with the same frozen router
    logp = jax.nn.log_softmax(dense(ids) / tau)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1) * tau * tau
    ce = -jnp.take_along_axis(jax.nn.log_softmax(model(ids)), targets[..., None], -1)[..., 0]
    mean = lambda v: float(jnp.sum(v * mask) / jnp.sum(mask))
    gd, tr, frozen = steps.split_for(model, "expert")
    frozen = steps.ExpertStep.frozen_with_teacher(frozen, dense)
    tx = make_optimizer(1.0, 4)
    step = steps.ExpertStep(gd, tx, steps.StepShardings.of(tr, frozen, tx, make_mesh()), num_experts=3,
                            loss=steps.ExpertLoss("mix", w, tau), teacher=nnx.split(dense))
    batch = {"input_ids": ids, "targets": targets, "loss_mask": mask}
    batch = {k: steps.microbatches(v, 1) for k, v in batch.items()}
    before = np.asarray(tr["experts"]["w_up"][...]) if "w_up" in tr["experts"] else None
    new_tr, _, m = step(tr, tx.init(tr), frozen, batch, jnp.float32(1e-2))
    host = steps.check_finite(m, phase="expert_0", step=1)
    np.testing.assert_allclose(host["nll"], mean(ce), rtol=1e-4)
    np.testing.assert_allclose(host["kl"], mean(kl), rtol=1e-4)
    np.testing.assert_allclose(host["loss"], (1 - w) * mean(ce) + w * mean(kl), rtol=1e-4)
    assert host["grad_norm"] > 0 and host["kl"] > 1e-3
    if before is not None:
        assert not np.array_equal(before, np.asarray(new_tr["experts"]["w_up"][...]))
