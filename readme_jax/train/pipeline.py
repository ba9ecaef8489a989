"""The Read-ME pipeline behind ``python -m readme_jax.train``: the stages of :data:`~readme_jax.train.stages.STAGES`
in order, each skipped when it is done.

    dense       the dense parent (random-tiny: synthetic texts + BPE + random Llama -> <run>/dense/)
    corpus      build (or verify) the per-domain corpus                      -> <run>/corpus/manifest.json
    dense_eval  held-out perplexity of the dense parent                      -> <run>/eval/dense.json
    stats       calibration statistics, mean |down_proj input| per domain    -> <run>/extract/scores.npz
    extract     expert masks (+ sizes, active / total parameter counts)      -> <run>/extract/masks.npz
    targets     the router pool: train.router_pool_seqs train sequences per  -> <run>/extract/router_targets.npz
                domain + the dense parent's distillation targets (one pass)
    rounds      router_r, expert_r for r < train.rounds (resumable mid-round) -> <run>/checkpoints/<phase>/
    round_evals the MoE after router_0 (before any expert tuning), rebuilt from  -> <run>/eval/router_0.json
                its checkpoint; with eval.each_round also after expert_r        (+ expert_r.json)
    final_eval  perplexity, router accuracy, locality, expert load           -> <run>/eval/final.json
                (the evaluations cache the dense parent's argmax targets of the held-out routing windows
                 in <run>/extract/heldout_routing.npz, recomputed when the windows change)
    export      a Read-ME checkpoint ``readme_jax.load_pretrained`` reads     -> <run>/export/
    plots       loss per round, perplexity per domain per round, expert load -> <run>/plots/*.png

Why the router targets are a pool computed once: :mod:`readme_jax.train.targets`. The run folder's paths and
shared objects: :mod:`readme_jax.train.run`. The routing metrics and the closing table:
:mod:`readme_jax.eval.routing`.

The run folder also holds ``config.yaml`` (the resolved config, written once every check passed),
``stages.json`` (the settings each stage ran with: a rerun that changes the settings of a stage with outputs is
refused, unless the stage is an evaluation, which is re-run), ``metrics.jsonl`` and ``.lock`` (one run at a time).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from readme_jax.atomic import atomic_write_text
from readme_jax.config import Config
from readme_jax.convert.checkpoint import remove_leftovers
from readme_jax.errors import PipelineError
from readme_jax.eval.routing import SUMMARY_COLUMNS, summary_table
from readme_jax.train.hooks import TrainHooks
from readme_jax.train.lock import RunLock
from readme_jax.train.preflight import preflight
from readme_jax.train.records import StageRecords
from readme_jax.train.run import Run, say
from readme_jax.train.stages import STAGE_NAMES, STAGES

def remove_litter(run: Run) -> list[Path]:
    """Delete what interrupted atomic writes of this run left (``.<name>.tmp-*`` / ``.<name>.old-*`` next to
    the export, a checkpoint, an ``eval/*.json``, ...): the run holds the folder's lock, so none is in use."""
    removed = remove_leftovers(run.dir, recursive=True)
    if removed:
        say(f"[run] removed {len(removed)} leftover(s) of interrupted writes: "
            f"{', '.join(str(p.relative_to(run.dir)) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
    return removed


def summary(run: Run) -> str:
    """The closing table of the run's evaluations (:func:`readme_jax.eval.routing.summary_table`)."""
    return summary_table({t: json.loads(run.eval_path(t).read_text()) for t in SUMMARY_COLUMNS
                          if run.eval_path(t).exists()})


def run_pipeline(cfg: Config, run_dir: str | Path | None = None, *, stage: str | None = None,
                 progress: bool = True, hooks: TrainHooks | None = None) -> Run:
    """Run every stage in order (or only ``stage``), skipping those that are done; ``hooks`` go to the trainer.

    Before any stage: the config is checked against the environment (:func:`~readme_jax.train.preflight.preflight`),
    the run folder is locked (:class:`~readme_jax.train.lock.RunLock`; a second run on it is refused), and the
    config is compared with the settings each stage ran with (:class:`~readme_jax.train.records.StageRecords`):
    changed evaluation settings re-run those evaluations, changed training settings are refused. Only then is
    ``config.yaml`` written."""
    if stage is not None and stage not in STAGE_NAMES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")
    preflight(cfg)
    run = Run(cfg, run_dir or Path("runs") / cfg.name, progress=progress, hooks=hooks)
    main = jax.process_index() == 0
    with RunLock(run.dir, enabled=main):
        records = StageRecords(run.dir, enabled=main)
        stale = records.plan(STAGES, run)
        if main:
            remove_litter(run)
            atomic_write_text(run.config_path, cfg.to_yaml())
        t_start = time.time()
        for st in STAGES:
            if stage is not None and st.name != stage:
                continue
            if st.name in stale:
                say(f"[{st.name}] settings changed ({', '.join(records.changed(st, cfg)) or 'an input'}): re-running")
                for p in st.outputs(run):
                    if p.is_file() and main:
                        p.unlink()
            elif st.is_done(run):
                say(f"[{st.name}] output exists, skipped")
                continue
            records.started(st, cfg)
            t0 = time.time()
            st.fn(run)
            run.log.write({"event": "stage", "stage": st.name, "seconds": round(time.time() - t0, 1)})
        if stage in (None, "final_eval"):
            say(summary(run))
            say(f"[done] {run.dir} in {time.time() - t_start:.1f} s")
    return run
