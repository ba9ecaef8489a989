"""Held-out perplexity against the main job's wall clock: every kept checkpoint of a run's expert phases.

    python -m readme_jax.science curve --run-dir runs/long                      # needs train.keep_checkpoints: null
    python -m readme_jax.science curve --run-dir runs/default curve.compare='["runs/long"]'

x of a point: the seconds of the run's stages before ``rounds`` (from ``metrics.jsonl``) plus the step seconds
of every phase up to the checkpoint (a step's seconds include its checkpoint write). Points: the MoE after
router_0 (``eval/router_0.json``: no expert tuning), each kept checkpoint of each expert phase (evaluated here
with the run's own protocol, ``eval.max_tokens`` held-out tokens per domain), and the run's final evaluation
(``eval/final.json``). A run trained with one kept checkpoint per phase (the default) gives its router_0 and
final points only. ``compare`` overlays other runs whose ``curve`` result exists (run it there first).

Writes ``<run>/science/curve/``: ``result.json`` (points per run), ``table.md``, ``ppl_vs_time.png`` (one panel
per domain: each run's curve, the dense parent and 1.5x the dense parent dashed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from readme_jax.errors import PipelineError
from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import domain_curves
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train.run import Run, say
from readme_jax.train.trainer import phases

GOAL_RATIO = 1.5       # issue 19's goal: final perplexity <= 1.5x the dense parent's on every domain


@dataclasses.dataclass(frozen=True)
class CurveSettings:
    """``compare``: run folders whose ``science/curve/result.json`` is drawn alongside this run's."""
    compare: tuple[str, ...] = ()


def stage_seconds_before_rounds(run: Run) -> float:
    """Seconds of the run's stages before 'rounds' (their ``stage`` records; a forked run's reused stages,
    which have none here, count 0)."""
    from readme_jax.train.stages import STAGE_NAMES
    before = set(STAGE_NAMES[:STAGE_NAMES.index("rounds")])
    return sum(float(r["seconds"]) for r in run.log.records()
               if r.get("event") == "stage" and r.get("stage") in before)


def step_clock(run: Run) -> dict[str, list[float]]:
    """{phase: cumulative step seconds after step 1, 2, ...} from ``metrics.jsonl``."""
    out: dict[str, dict[int, float]] = {}
    for r in run.log.records():
        if r.get("event") == "step":
            out.setdefault(r["phase"], {})[int(r["step"])] = float(r["seconds"])
    clocks = {}
    for name, steps in out.items():
        total, acc = 0.0, []
        for s in range(1, max(steps) + 1):
            if s not in steps:
                raise PipelineError(f"{run.dir}/metrics.jsonl: phase {name} has no record of step {s}")
            total += steps[s]
            acc.append(total)
        clocks[name] = acc
    return clocks


def _point(label: str, seconds: float, ppl: dict) -> dict:
    return {"label": label, "seconds": round(seconds, 2), "ppl": {d: v["ppl"] for d, v in ppl.items()}}


def run_curve(run: Run, part) -> list[dict]:
    """The run's points, in training order; ``part(name, fn)`` caches each evaluation (``Experiment.part``)."""
    from readme_jax.train.checkpointing import PhaseCheckpoints
    from readme_jax.train.stages import heldout_perplexity
    clock, t0 = step_clock(run), stage_seconds_before_rounds(run)
    sched = phases(run.cfg)
    points, elapsed = [], t0
    final = json.loads(run.eval_path("final").read_text())
    built = {}             # phase -> the extracted model with that phase's router, built once per phase; each
                           # of its checkpoints is loaded into it (an expert phase trains every backbone param)

    def model_at(p, s):
        if p.name not in built:
            built.clear()
            built[p.name] = run.model_after(p, fused=False, step=s)
        else:
            run.trainer(built[p.name]).load_done(p, s)
        return built[p.name].untied()

    for p in sched:
        ticks = clock.get(p.name, [])
        if len(ticks) < p.steps:
            raise PipelineError(f"{run.dir}/metrics.jsonl: phase {p.name} records {len(ticks)} of its {p.steps} steps")
        if p.kind == "router" and p.round == 0:
            r0 = json.loads(run.eval_path("router_0").read_text())["ppl"]
            points.append(_point("router_0", elapsed + ticks[-1], r0))
        if p.kind == "expert":
            last = p == sched[-1]
            for s in PhaseCheckpoints(run.phase_dir(p)).steps():
                if last and s == p.steps:
                    continue                            # the final evaluation below
                say(f"[curve] {run.dir.name}: {p.name} step {s}")
                ppl = part(f"{p.name}_{s}", lambda p=p, s=s: heldout_perplexity(run, model_at(p, s)))
                points.append(_point(f"{p.name} step {s}", elapsed + ticks[s - 1], ppl))
        elapsed += ticks[-1]
    points.append(_point("final", elapsed, final["ppl"]))
    return points


@EXPERIMENTS.register("curve", CurveSettings)
def curve(parent: Run, settings, *, progress: bool = True) -> dict:
    """Perplexity per domain at every kept checkpoint against wall clock (settings: CurveSettings)."""
    others = {}
    for d in settings.compare:
        f = Path(d) / "science" / "curve" / "result.json"
        if not f.is_file():
            raise PipelineError(f"curve.compare: {f} does not exist; run python -m readme_jax.science curve "
                                f"--run-dir {d} first")
        others.update(json.loads(f.read_text())["curves"])
    with Experiment(parent, "curve", {"compare": list(settings.compare)}) as ex:
        name = parent.dir.name
        curves = {name: run_curve(parent, ex.part), **{k: v for k, v in others.items() if k != name}}
        dense = {d: v["ppl"] for d, v in json.loads(parent.eval_path("dense").read_text())["ppl"].items()}
        domain_curves(curves, dense, ex.path("ppl_vs_time.png"), goal_ratio=GOAL_RATIO)
        domains = list(dense)
        rows = [[run_name, p["label"], f"{p['seconds'] / 60:.1f}", *[p["ppl"][d] for d in domains]]
                for run_name, pts in curves.items() for p in pts]
        rows.append(["dense parent", "", "", *[dense[d] for d in domains]])
        result = {"curves": {name: curves[name]}, "compared": sorted(set(curves) - {name}), "dense": dense}
        ex.finish(result, markdown_table(["run", "point", "wall clock min", *domains], rows))
        return result
