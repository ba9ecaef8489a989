"""The Read-ME pipeline as a table of stages: the tiny run end to end (every output, skipped when rerun), the
table's own consistency, the router pool, a failed checkpoint write resumed, the export, and bad input."""

from __future__ import annotations

import errno
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.config import Config, load_config
from readme_jax.errors import CheckpointError
from readme_jax.train import losses
from readme_jax.train.stages import STAGE_NAMES, STAGES
from tests.faults import Faults
from tests.tiny_run import train_cli


def _params(module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def test_stage_table_is_consistent():
    assert len(set(STAGE_NAMES)) == len(STAGES)
    sections = Config().to_dict()
    for i, st in enumerate(STAGES):
        assert set(st.needs) <= set(STAGE_NAMES[:i]), f"{st.name} needs a later stage"
        for key in st.keys:                                   # "section" or "section.key" of the config
            section, _, name = key.partition(".")
            assert section in sections and (not name or name in sections[section]), f"{st.name}: {key}"


def test_tiny_pipeline_end_to_end(tiny_run, tmp_path):
    from readme_jax.train.run import Run
    run_dir, proc = tiny_run
    run = Run(load_config("tiny"), run_dir, progress=False)
    for st in STAGES:
        assert all(p.exists() for p in st.outputs(run)), st.name
        assert st.is_done(run) == (st.name != "plots"), st.name            # plots are always redrawn
    empty = Run(load_config("tiny"), tmp_path / "empty", progress=False)
    assert not any(st.is_done(empty) for st in STAGES)
    final = json.loads(run.eval_path("final").read_text())
    assert set(final["ppl"]) == {"alpha", "beta", "gamma"}
    assert 0.0 <= final["router_accuracy"] <= 1.0 and 0.0 <= final["locality"] <= 1.0
    r0 = json.loads(run.eval_path("router_0").read_text())
    assert all(final["ppl"][d]["ppl"] < r0["ppl"][d]["ppl"] for d in final["ppl"])   # expert tuning helps
    out = proc.stdout + proc.stderr
    assert "MoE router_0" in out and "router accuracy" in out and "routing locality" in out
    assert out.count("held-out perplexity (per domain)") == 1                 # the closing table, once
    # rerunning the finished command skips every stage (on a copy: other workers read the shared run)
    shutil.copytree(run_dir, tmp_path / "again")
    again = train_cli(tmp_path / "again")
    assert again.returncode == 0 and "[rounds] output exists, skipped" in again.stdout + again.stderr


def test_router_pool_is_the_dense_targets_and_a_router_round_resumes_after_a_failed_checkpoint_write(
        tiny_run, tmp_path, monkeypatch):
    from readme_jax.model.llama import Llama
    from readme_jax.train import targets
    from readme_jax.train.metrics_log import MetricsLog
    from readme_jax.train.run import Run
    from readme_jax.train.trainer import Trainer, phases
    cfg = load_config("tiny")
    run = Run(cfg, tiny_run[0], progress=False)
    pool = run.router_pool
    E, n = run.masks.num_experts, cfg.train.router_pool_seqs
    assert pool.input_ids.dtype == np.int32 and pool.input_ids.shape == (3 * n, cfg.train.seq_len)
    assert pool.dist.shape == (3 * n, run.dense.config.num_layers, cfg.train.seq_len, E)
    assert np.bincount(pool.domain).tolist() == [n] * 3                        # balanced across domains
    ref = losses.router_targets(run.dense, jnp.asarray(pool.input_ids), None, jnp.asarray(run.masks.specific),
                                use_abs=cfg.train.target_abs)
    np.testing.assert_allclose(pool.dist, np.swapaxes(np.asarray(ref), 0, 1), atol=1e-5)

    # a router round on the pool, with every way into the dense model broken: the backbone stays bitwise
    router_0 = phases(cfg)[0]
    model, ref_model = run.fresh_model(), run.fresh_model()
    run.trainer(ref_model).load_done(router_0)                          # the pipeline's own router_0

    def boom(*a, **k):
        raise AssertionError("the dense model ran during a router round")
    for name in ("__call__", "hidden_states", "layer_arrays"):
        monkeypatch.setattr(Llama, name, boom)
    monkeypatch.setattr(losses, "router_targets", boom)
    monkeypatch.setattr(targets, "router_targets", boom)
    before = _params(model)
    # the disk fills up at the checkpoint of step 4: the write fails, step 2 stays the latest checkpoint
    trainer = Trainer(cfg, tmp_path, model, pool, run.masks.specific, run.corpus, run.tokenizer,
                      MetricsLog(tmp_path / "m.jsonl"), progress=False, hooks=Faults(disk_full_at=("router_0", 4)))
    with pytest.raises(CheckpointError, match=r"router_0/4: writing the checkpoint failed .*last good checkpoint "
                                              r"is step 2") as e:
        trainer.run(router_0)
    assert e.value.__cause__.errno == errno.ENOSPC
    assert trainer.checkpoints(router_0).latest_step() == 2 and not trainer.is_done(router_0)
    trainer.hooks = Faults()                                             # the rerun resumes from step 2
    trainer.run(router_0)
    after = _params(model)
    for k in before:
        if k != "router":
            jax.tree.map(np.testing.assert_array_equal, before[k], after[k])
    assert not np.array_equal(before["router"]["head"], after["router"]["head"])
    # same router as the pipeline's own router_0 (resumable state = pool position)
    meta = trainer.checkpoints(router_0).meta()
    assert meta["data_state"] == {"pool_position": cfg.train.router_steps * cfg.train.router_batch}
    jax.tree.map(np.testing.assert_array_equal, _params(ref_model.router), _params(model.router))
    assert [r["step"] for r in MetricsLog(tmp_path / "m.jsonl").records()] == list(range(1, 7))


def test_export_loads_back_with_same_logits(tiny_run):
    from readme_jax import load_pretrained
    from readme_jax.train.run import Run
    run_dir = tiny_run[0]
    model, tok = load_pretrained(run_dir / "export", dtype=None)
    assert tok is not None and type(model).__name__ == "ReadMe"
    trained = Run(load_config("tiny"), run_dir, progress=False).trained_model()
    # 4 x 64 tokens: the shape the run evaluates with
    ids = jnp.asarray(np.resize(np.asarray(tok.encode("ka ro mi the zor qui shoo", bos=True)), (4, 64)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(trained(ids)))
    assert not list(run_dir.glob(".export*")), "the export left a temp folder"


@pytest.mark.slow(reason="runs the CLI in a fresh process (imports jax, compiles)")
def test_domain_with_too_few_calibration_tokens_is_a_clear_error(tmp_path):
    from readme_jax.train.pipeline import run_pipeline
    from readme_jax.errors import PipelineError
    cfg = load_config("tiny", ["extract.calib_seqs=400"])
    for stage in ("dense", "corpus"):
        run_pipeline(cfg, tmp_path / "run", stage=stage, progress=False)
    with pytest.raises(PipelineError, match=r"domain 'alpha': .*train.jsonl holds [\d,]+ tokens = \d+ calibration "
                                            r"sequences of 64; extract.calib_seqs=400"):
        run_pipeline(cfg, tmp_path / "run", stage="stats", progress=False)


def test_rerun_with_different_training_config_is_refused(tiny_run):
    from readme_jax.train.pipeline import run_pipeline
    from readme_jax.errors import StaleRunError
    with pytest.raises(StaleRunError,
                       match=r"other settings \(stage 'rounds': train.rounds; stage 'export': train.rounds\)"):
        run_pipeline(load_config("tiny", ["train.rounds=3"]), tiny_run[0], stage="plots", progress=False)
