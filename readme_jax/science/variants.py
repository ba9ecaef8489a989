"""Variant runs of the default pipeline: the parent's config plus overrides, forked from the parent folder.

    out = run_variant(parent, ex.path("expert_lr=0.001"), ["train.expert_lr=1e-3"])
    out["final"]["ppl"]["code"]["ppl"], out["rounds_seconds"]

A variant is a run folder of its own (``python -m readme_jax.train --run-dir`` on it resumes or reuses it),
made by :func:`readme_jax.science.fork.fork_run` and finished by the pipeline's stages up to 'final_eval'
(no export, no plots: the variant is measured, not shipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from readme_jax.config import load_config
from readme_jax.science.fork import fork_run
from readme_jax.train.pipeline import run_pipeline
from readme_jax.train.run import Run, say
from readme_jax.train.stages import STAGE_NAMES

MEASURED_STAGES = tuple(n for n in STAGE_NAMES if n not in ("export", "plots"))


def variant_config(parent: Run, overrides: list[str]):
    return load_config(parent.config_path, overrides)


def run_variant(parent: Run, child_dir: Path, overrides: list[str], *, progress: bool = True,
                stages: tuple[str, ...] = MEASURED_STAGES) -> dict:
    """Fork, run ``stages``, and return ``{"overrides", "reused", "final", "router_0", "phase_seconds"}``
    (the evaluations' JSON and the summed step seconds of each phase, from the variant's metrics)."""
    cfg = variant_config(parent, overrides)
    reused = fork_run(parent.dir, child_dir, cfg)
    if reused.get("stages") or reused.get("phases"):
        say(f"[variant {child_dir.name}] reusing stages {reused['stages']} and phases {reused['phases']} "
            f"of {parent.dir}")
    for name in stages:
        run_pipeline(cfg, child_dir, stage=name, progress=progress)
    run = Run(cfg, child_dir, progress=False)
    evals = {t: json.loads(run.eval_path(t).read_text()) for t in ("router_0", "final") if run.eval_path(t).is_file()}
    return {"overrides": overrides, "reused": reused, **evals, "phase_seconds": phase_seconds(run)}


def phase_seconds(run: Run) -> dict[str, float]:
    """{phase: summed step seconds} from ``metrics.jsonl`` (checkpoint writes and compiles of the first step
    included, since they are part of what a phase costs)."""
    out: dict[str, float] = {}
    for r in run.log.records():
        if r.get("event") == "step":
            out[r["phase"]] = out.get(r["phase"], 0.0) + float(r.get("seconds", 0.0))
    return {k: round(v, 1) for k, v in out.items()}


def steady_step_seconds(run: Run, kind: str) -> float:
    """Median step seconds of the phases of ``kind`` (the first step of each phase, with its compile, left out)."""
    xs = [float(r["seconds"]) for r in run.log.records()
          if r.get("event") == "step" and r.get("kind") == kind and r.get("step", 1) > 1]
    if not xs:
        raise ValueError(f"{run.dir}: no {kind} steps in metrics.jsonl")
    return float(np.median(xs))
