"""Kill and resume: a real process killed mid-round, a diverged update, then the normal CLI ends with the same
metrics and evaluations as the uninterrupted tiny run."""

from __future__ import annotations

import json

from readme_jax.train.checkpointing import PhaseCheckpoints
from tests.faults import EXIT_CODE
from tests.tiny_run import step_and_eval_records, train_cli


def test_kill_then_diverge_then_rerun_matches_uninterrupted(tiny_run, tmp_path):
    ref_dir = tiny_run[0]
    run_dir = tmp_path / "run"
    # os._exit right after update 3 of expert_0 (its last checkpoint is step 2): a kill, no cleanup
    killed = train_cli(run_dir, module="tests.faults", pre=("--exit-at", "expert_0:3", "--"))
    assert killed.returncode == EXIT_CODE, killed.stderr[-2000:]
    assert not (run_dir / "checkpoints" / "expert_1").exists()
    # update 3 of expert_1 at an infinite learning rate: refused, nothing of it saved
    diverged = train_cli(run_dir, module="tests.faults", pre=("--nan-at", "expert_1:3", "--"))
    assert diverged.returncode == 2
    assert "TrainingDivergedError: expert_1, step 3: non-finite" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert "resuming at step 2/6" in diverged.stdout + diverged.stderr  # expert_0 resumed mid-round
    # the last good checkpoint (expert_1 step 2) is intact and loadable
    ck = PhaseCheckpoints(run_dir / "checkpoints" / "expert_1")
    assert ck.latest_step() == 2
    meta = ck.meta()
    assert meta["done"] is False and meta["step"] == 2
    resumed = train_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_and_eval_records(run_dir) == step_and_eval_records(ref_dir)
    assert json.loads((run_dir / "eval/final.json").read_text())["ppl"] == \
        json.loads((ref_dir / "eval/final.json").read_text())["ppl"]
