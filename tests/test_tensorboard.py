"""The run's TensorBoard event files (``train/tensorboard.py``) hold what ``metrics.jsonl`` holds."""

import json
import struct

import pytest

from readme_jax.config import load_config
from readme_jax.train.tensorboard import expert_steps_before


def read_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the TFRecord event files under ``directory`` (tensorboardX's
    own protobuf definitions; TFRecord framing: length u64, its crc u32, data, the data's crc u32)."""
    from tensorboardX.proto.event_pb2 import Event
    out: dict[str, dict[int, float]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for f in files:
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_event_files_mirror_the_metrics_log(tiny_run):
    run_dir, _ = tiny_run
    scalars = read_scalars(run_dir / "tensorboard")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("event") == "step" and r["phase"] == "expert_0"]
    assert steps
    for r in steps:
        assert scalars["expert_0/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["expert_0/lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
    cfg = load_config(run_dir / "config.yaml")
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    total = cfg.train.rounds * cfg.train.expert_steps
    for d, v in final["ppl"].items():
        assert scalars[f"eval/ppl_{d}"][total] == pytest.approx(v["ppl"], rel=1e-6)
        assert 0 in scalars[f"eval/ppl_{d}"] and 0 in scalars[f"dense/ppl_{d}"]       # router_0, the dense parent
    assert "stage_seconds/rounds" in scalars


def test_eval_steps_follow_the_schedule():
    cfg = load_config(None, ["train.rounds=2", "train.expert_steps=5"])
    assert [expert_steps_before(cfg, t) for t in ("dense", "router_0", "expert_0", "router_1", "final")] == \
        [0, 0, 5, 5, 10]


def test_mirrors_of_one_folder_share_one_event_file(tmp_path):
    from readme_jax.train.tensorboard import TensorBoardMirror
    cfg = load_config(None)
    for i in (1, 2):                                            # e.g. one Run per stage of a science variant
        TensorBoardMirror(tmp_path / "tb", cfg)({"event": "step", "phase": "expert_0", "step": i, "loss": 1.0 / i,
                                                 "ok": True})
    TensorBoardMirror(tmp_path / "tb", cfg)({"event": "other"})            # no scalars: nothing written
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert read_scalars(tmp_path / "tb") == {"expert_0/loss": {1: 1.0, 2: 0.5}}
