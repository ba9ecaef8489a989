"""The Read-ME pipeline behind ``python -m readme_jax.train``: the stages of :data:`~readme_jax.train.stages.STAGES`
in order, each skipped when it is done.

    dense       the dense parent (random-tiny: synthetic texts + BPE + random Llama -> <run>/dense/)
    corpus      build (or verify) the per-domain corpus                      -> <run>/corpus/manifest.json
    dense_eval  held-out perplexity of the dense parent                      -> <run>/eval/dense.json
    stats       calibration statistics, mean |down_proj input| per domain    -> <run>/extract/scores.npz
    extract     expert masks (+ sizes, active / total parameter counts)      -> <run>/extract/masks.npz
    targets     the router pool: train.router_pool_seqs train sequences per  -> <run>/extract/router_targets.npz
                domain + the dense parent's distillation targets (one pass);
                + argmax targets of the held-out routing windows             -> <run>/extract/heldout_routing.npz
    rounds      router_r, expert_r for r < train.rounds (resumable mid-round) -> <run>/checkpoints/<phase>/
                (+ <run>/eval/router_0.json: the MoE after the first router round, before any expert tuning)
    final_eval  perplexity, router accuracy, locality, expert load           -> <run>/eval/final.json
    export      a Read-ME checkpoint ``readme_jax.load_pretrained`` reads     -> <run>/export/
    plots       loss per round, perplexity per domain per round, expert load -> <run>/plots/*.png

Why the router targets are a pool computed once: :mod:`readme_jax.train.targets`. The run folder's paths and
shared objects: :mod:`readme_jax.train.run`. The routing metrics and the closing table:
:mod:`readme_jax.eval.routing`.

The run folder also holds ``config.yaml`` (the resolved config; a rerun with different model / corpus /
extract / router / train settings is refused, since it could not resume) and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from readme_jax.atomic import atomic_write_text
from readme_jax.config import Config
from readme_jax.eval.routing import SUMMARY_COLUMNS, summary_table
from readme_jax.train.hooks import TrainHooks
from readme_jax.train.run import PipelineError, Run, say
from readme_jax.train.stages import STAGE_NAMES, STAGES

RESUME_SECTIONS = ("model", "corpus", "extract", "router", "train")   # must match to reuse a run folder


def write_config(run: Run) -> None:
    """Record the resolved config in ``config.yaml``; refuse a folder made with other resume sections."""
    path, new = run.config_path, run.cfg.to_dict()
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        diff = [s for s in RESUME_SECTIONS if old.get(s) != new.get(s)]
        if diff:
            raise PipelineError(f"{path}: this run folder was made with different {diff} settings; "
                                "resuming would mix two runs. Use another --run-dir, or delete the folder.")
    atomic_write_text(path, run.cfg.to_yaml())


def summary(run: Run) -> str:
    """The closing table of the run's evaluations (:func:`readme_jax.eval.routing.summary_table`)."""
    return summary_table({t: json.loads(run.eval_path(t).read_text()) for t in SUMMARY_COLUMNS
                          if run.eval_path(t).exists()})


def run_pipeline(cfg: Config, run_dir: str | Path | None = None, *, stage: str | None = None,
                 progress: bool = True, hooks: TrainHooks | None = None) -> Run:
    """Run every stage in order (or only ``stage``), skipping those that are done; ``hooks`` go to the trainer."""
    if stage is not None and stage not in STAGE_NAMES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")
    run = Run(cfg, run_dir or Path("runs") / cfg.name, progress=progress, hooks=hooks)
    write_config(run)
    t_start = time.time()
    for st in STAGES:
        if stage is not None and st.name != stage:
            continue
        if st.is_done(run):
            say(f"[{st.name}] output exists, skipped")
            continue
        t0 = time.time()
        st.fn(run)
        run.log.write({"event": "stage", "stage": st.name, "seconds": round(time.time() - t0, 1)})
    if stage in (None, "final_eval"):
        say(summary(run))
        say(f"[done] {run.dir} in {time.time() - t_start:.1f} s")
    return run
