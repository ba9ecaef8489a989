"""Run folders made before tied experts (or before the frozen-embedding default): refused with a message naming
the override that resumes them, and a fused expert checkpoint is never restored into tied tables."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.config import load_config
from readme_jax.errors import CheckpointError
from readme_jax.extract.experts import readme_from_dense
from readme_jax.extract.masks import build_masks
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from readme_jax.model.router import RouterConfig
from readme_jax.train.checkpointing import PhaseCheckpoints
from readme_jax.train.metrics_log import MetricsLog
from readme_jax.train.records import RECORDS_FILE, StageRecords, StaleRunError
from readme_jax.train.run import Run
from readme_jax.train.stages import STAGES
from readme_jax.train.trainer import Trainer, phases
from tests.tiny_models import random_model


def _old_folder(tmp_path):
    """A run folder whose records were written before train.experts existed, with a finished router phase."""
    old_cfg = load_config(None, ["train.experts=fused"])
    records = StageRecords(tmp_path)
    for st in STAGES:
        records.started(st, old_cfg)
    data = json.loads((tmp_path / RECORDS_FILE).read_text())
    del data["rounds"]["train"]["experts"]
    (tmp_path / RECORDS_FILE).write_text(json.dumps(data))
    (tmp_path / "checkpoints" / "router_0").mkdir(parents=True)
    return tmp_path


def test_old_folder_is_refused_with_the_override_that_resumes_it(tmp_path):
    run_dir = _old_folder(tmp_path)
    with pytest.raises(StaleRunError, match=r"train\.experts.*train\.experts='fused'"):
        StageRecords(run_dir).plan(STAGES, Run(load_config(None), run_dir, progress=False))
    # with the override it is the same run again: nothing refused, nothing re-run
    assert StageRecords(run_dir).plan(STAGES, Run(load_config(None, ["train.experts=fused"]), run_dir,
                                                  progress=False)) == set()


def test_folder_tuned_with_the_embedding_is_refused_with_the_override_that_resumes_it(tmp_path):
    """train.freeze_embedding's default changed to true: a folder whose records predate the key (it trained the
    embedding) or that recorded false is refused, told the override; with it, nothing is refused."""
    for drop in (True, False):
        run_dir = tmp_path / str(drop)
        old_cfg = load_config(None, ["train.freeze_embedding=false"])
        records = StageRecords(run_dir)
        for st in STAGES:
            records.started(st, old_cfg)
        if drop:
            data = json.loads((run_dir / RECORDS_FILE).read_text())
            del data["rounds"]["train"]["freeze_embedding"]
            (run_dir / RECORDS_FILE).write_text(json.dumps(data))
        (run_dir / "checkpoints" / "router_0").mkdir(parents=True)
        with pytest.raises(StaleRunError, match=r"train\.freeze_embedding.*train\.freeze_embedding=False"):
            StageRecords(run_dir).plan(STAGES, Run(load_config(None), run_dir, progress=False))
        assert StageRecords(run_dir).plan(STAGES, Run(load_config(None, ["train.freeze_embedding=false"]), run_dir,
                                                      progress=False)) == set()


def test_fused_expert_checkpoint_is_not_restored_into_tied_tables(tmp_path):
    cfg_l = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    dense = random_model(lambda rngs: Llama(cfg_l, rngs=rngs))
    masks = build_masks(np.random.default_rng(0).random((3, 2, 32)), 0.5)
    rcfg = RouterConfig(vocab_size=64, dim=16, n_heads=2, mlp_dim=16, num_experts=3, embed_rank=8)
    fused = readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(0))
    cfg = load_config(None)
    phase = [p for p in phases(cfg) if p.kind == "expert"][0]
    _, trainable, _ = nnx.split(fused, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("router"))), ...)
    ck = PhaseCheckpoints(tmp_path / "checkpoints" / phase.name)
    ck.save(1, trainable, {"count": jnp.zeros(())}, {"done": True, "step": 1})   # a meta from before "experts"
    tied = readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(0), tied=True)
    trainer = Trainer(cfg, tmp_path, tied, None, masks.specific, None, None, MetricsLog(tmp_path / "m.jsonl"),
                      progress=False)
    with pytest.raises(CheckpointError, match=r"fused experts \(written before train\.experts existed\).*"
                                              r"train\.experts=fused"):
        trainer.load_done(phase)
