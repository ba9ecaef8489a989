"""Fork a finished run folder into a variant run that reuses every output the variant's config shares.

    copied = fork_run("runs/default", "runs/default/science/ablate_lr/expert_lr=1e-3", variant_cfg)
    run_pipeline(variant_cfg, that_dir)          # runs only what the variant changes

An ablation changes one or two knobs of the default run; everything upstream of them (corpus, statistics,
masks, router targets, the phases of the schedule before the first one that differs) is the same
computation on the same inputs, so it is linked (hard links: no extra disk, and the parent's files are never
written again: every writer of this project replaces files atomically) instead of recomputed. The rules are
those of :mod:`readme_jax.train.records`:

* a stage is reused when the parent ran it with the variant's settings (its recorded ``keys``) and every stage
  it ``needs`` was reused too;
* stage 'rounds' is reused phase by phase: the longest common prefix of the two schedules
  (:func:`readme_jax.train.trainer.phases`, equal ``Phase`` records) when the settings every phase shares
  (:data:`PHASE_SHARED_KEYS`, the router config) are equal and its inputs were reused;
* the child's ``stages.json`` records the variant's settings for what was reused, and its ``metrics.jsonl``
  the parent's records of the reused stages and phases, so the child reads as a run of its own config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from readme_jax.atomic import atomic_write_json, atomic_write_text
from readme_jax.config import Config, load_config
from readme_jax.errors import PipelineError
from readme_jax.train.checkpointing import phase_done
from readme_jax.train.records import RECORDS_FILE, key_value
from readme_jax.train.run import Run
from readme_jax.train.stages import STAGES
from readme_jax.train.trainer import phases

# train keys every phase's numbers depend on besides its own Phase record (steps, batch, peak lr, seed)
PHASE_SHARED_KEYS = ("train.seq_len", "train.dtype", "train.grad_accum", "train.weight_decay", "train.grad_clip",
                     "train.target_abs", "train.seed", "train.remat", "train.router_pool_seqs", "router", "mesh")
# keys that change the extracted model every phase starts from: its evaluation after router_0 and every expert
# phase depend on them (a router phase trains the router alone, from the pool's targets)
START_MODEL_KEYS = ("train.experts", "extract.refit", "extract.refit_ridge")
# ... and the keys of expert phases only (the loss, what is trained, how it is dispatched)
EXPERT_PHASE_KEYS = START_MODEL_KEYS + ("train.mixture", "train.expert_loss", "train.kd_weight",
                                        "train.kd_temperature", "train.freeze_embedding", "train.dispatcher")
_NEVER_REUSED = ("export", "plots")          # whole-run outputs: rebuilt by the variant


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (a file or a folder) to ``dst`` (copy where links are not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _records(run_dir: Path) -> dict:
    path = run_dir / RECORDS_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: missing; fork a run folder made by python -m readme_jax.train")
    return json.loads(path.read_text())


def _settings(stage, cfg: Config) -> dict:
    d = cfg.to_dict()
    return {k: key_value(d, k) for k in stage.keys}


def fork_run(parent_dir: str | Path, child_dir: str | Path, cfg: Config) -> dict[str, list[str]]:
    """Link into ``child_dir`` the outputs of ``parent_dir`` that ``cfg`` shares (module docstring).

    Returns ``{"stages": [...], "phases": [...]}``, what was reused. A child folder that already has
    ``stages.json`` is left alone (a resumed variant): the pipeline's own records then decide."""
    parent_dir, child_dir = Path(parent_dir), Path(child_dir)
    if (child_dir / RECORDS_FILE).is_file():
        return {"stages": [], "phases": [], "resumed": True}
    pcfg = load_config(parent_dir / "config.yaml")
    precords = _records(parent_dir)
    prun, crun = Run(pcfg, parent_dir, progress=False), Run(cfg, child_dir, progress=False)
    reused: list[str] = []
    reused_phases: list[str] = []
    child_records: dict = {}
    for st in STAGES:
        if st.name in _NEVER_REUSED:
            continue
        if st.name not in precords:      # never ran because it had nothing to do (model.source != random-tiny)
            if st.done is not None and st.is_done(prun) and st.is_done(crun):
                reused.append(st.name)
            continue
        if not all(n in reused for n in st.needs if n != "rounds"):
            continue
        same = precords[st.name] == _settings(st, cfg)
        if st.name == "rounds":
            shared_same = all(key_value(pcfg.to_dict(), k) == key_value(cfg.to_dict(), k) for k in PHASE_SHARED_KEYS)
            if not shared_same:
                continue
            for pp, cp in zip(phases(pcfg), phases(cfg)):
                own = EXPERT_PHASE_KEYS if cp.kind == "expert" else ()
                if (pp != cp or not phase_done(prun.phase_dir(pp))
                        or any(key_value(pcfg.to_dict(), k) != key_value(cfg.to_dict(), k) for k in own)):
                    break
                _link_tree(prun.phase_dir(pp), crun.phase_dir(cp))
                reused_phases.append(cp.name)
            if reused_phases:      # the variant's 'rounds' resumes after the reused phases
                child_records[st.name] = _settings(st, cfg)
            continue
        if "rounds" in st.needs:   # an evaluation of trained phases: router_0's only, when that phase was reused
            if st.name != "round_evals" or "router_0" not in reused_phases or not same or any(
                    key_value(pcfg.to_dict(), k) != key_value(cfg.to_dict(), k) for k in START_MODEL_KEYS):
                continue
            outs = [crun.eval_path("router_0")]
            src = [prun.eval_path("router_0")]
            if cfg.eval.each_round or not src[0].is_file():
                continue
        else:
            if not same or not st.is_done(prun):
                continue
            src, outs = st.outputs(prun), st.outputs(crun)
        if st.name == "corpus":          # the whole built corpus, not only its manifest
            src, outs = ([prun.corpus_dir], [crun.corpus_dir]) if not pcfg.corpus.dir else ([], [])
        if st.name == "dense":           # random-tiny: the whole checkpoint, its tokenizer and texts
            names = ("dense_dir", "tokenizer_dir", "texts_dir")
            src, outs = [getattr(prun, n) for n in names], [getattr(crun, n) for n in names]
        for s, o in zip(src, outs):
            if s.exists():
                _link_tree(s, o)
        if st.name == "extract" and prun.heldout_routing_path.is_file():
            _link_tree(prun.heldout_routing_path, crun.heldout_routing_path)
        child_records[st.name] = _settings(st, cfg)
        reused.append(st.name)
    child_dir.mkdir(parents=True, exist_ok=True)
    keep_tags = {"dense"} if "dense_eval" in reused else set()
    keep_tags |= {"router_0"} if "round_evals" in reused else set()
    lines = []
    for r in prun.log.records():
        ev = r.get("event")
        if ((ev == "step" and r.get("phase") in reused_phases) or (ev == "eval" and r.get("tag") in keep_tags)
                or (ev == "stage" and r.get("stage") in reused) or ev in {"stats", "extract", "targets"} & set(reused)):
            lines.append(json.dumps(r) + "\n")
    atomic_write_text(child_dir / "metrics.jsonl", "".join(lines))
    atomic_write_json(child_dir / RECORDS_FILE, child_records, indent=1)
    return {"stages": reused, "phases": reused_phases}
