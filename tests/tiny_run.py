"""The tiny pipeline run the training tests share (``configs/tiny.yaml``, run once per test session: the
``tiny_run`` fixture of tests/conftest.py), and helpers to run the CLI in a fresh process.

Import this module as ``tests.tiny_run`` only (one module object, one run). Tests must not change the run
folder: copy it first (``shutil.copytree``) to mutate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from readme_jax.train.throughput import WALL_CLOCK_KEYS

REPO = Path(__file__).resolve().parent.parent


def cli_env(**extra) -> dict:
    """The environment of a child run: one CPU device (not the 8 simulated ones of conftest; its other XLA flags
    kept, so the child compiles as the pytest process does), the repo importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu", **extra)
    return env


def train_cli(run_dir: Path, *args: str, module: str = "readme_jax.train",
              pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m MODULE PRE... --config tiny --run-dir RUN_DIR ARGS...`` in a fresh process."""
    cmd = [sys.executable, "-m", module, *pre, "--config", "tiny", "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)


def step_and_eval_records(run_dir: Path) -> list[dict]:
    """The step and eval records of ``metrics.jsonl`` without their wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") in ("step", "eval"):
            for k in WALL_CLOCK_KEYS:
                r.pop(k, None)
            out.append(r)
    return out
