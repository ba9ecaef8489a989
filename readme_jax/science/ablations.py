"""Ablations that decide the default run's budget, each as variant runs forked from the parent
(:mod:`readme_jax.science.variants`), keep ratio fixed at the parent's:

* ``ablate_lr``: the expert learning rate (``train.expert_lr``), everything else the parent's;
* ``ablate_quality``: the embedding tuned too and distillation mixed in, on the parent's schedule;
* ``ablate_budget``: more expert steps on the parent's schedule (the time a faster expert step frees);
* ``ablate_split``: router steps vs expert steps at equal wall time: ``ablate_split.rounds`` round(s), the
  expert phase given every expert step of the parent plus the steps the parent's later router rounds'
  measured wall time buys (at the parent's median expert-step time).

Each writes ``<run>/science/<name>/``: a variant run folder per setting, ``result.json``, ``table.md`` and
``ppl.png`` (final held-out perplexity per domain per setting, the parent's first).
"""

from __future__ import annotations

import dataclasses

from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.science.variants import phase_seconds, run_variant, steady_step_seconds
from readme_jax.train.run import Run, say


def _parent_row(parent: Run) -> dict:
    import json
    evals = {t: json.loads(parent.eval_path(t).read_text()) for t in ("router_0", "final")}
    return {"overrides": [], **evals, "phase_seconds": phase_seconds(parent)}


def _table(rows: dict[str, dict], domains: list[str]) -> str:
    header = ["setting", *domains, "router acc.", "rounds s"]
    body = []
    for name, r in rows.items():
        ppl = r["final"]["ppl"]
        body.append([name, *[ppl[d]["ppl"] for d in domains], r["final"].get("router_accuracy", float("nan")),
                     f"{sum(r['phase_seconds'].values()):.0f}"])
    return markdown_table(header, body)


def _finish(ex: Experiment, rows: dict[str, dict], domains: list[str], title: str, extra: dict | None = None) -> dict:
    grouped_bars({n: {d: r["final"]["ppl"][d]["ppl"] for d in domains} for n, r in rows.items()},
                 ex.path("ppl.png"), title=title, ylabel="held-out perplexity", log=True)
    result = {"rows": rows, **(extra or {})}
    ex.finish(result, _table(rows, domains))
    return result


def variant_name(overrides) -> str:
    return ",".join(o.split(".", 1)[-1] for o in overrides) or "parent"


@dataclasses.dataclass(frozen=True)
class AblateLrSettings:
    """Expert learning rate, on a schedule every variant shares: ``base`` overrides (default: none, the
    parent's schedule; a variant with the parent's settings reuses its expert phase), then each variant's
    overrides (default: the former 1e-4, today's 2e-4 and 3e-4)."""
    base: tuple[str, ...] = ()
    variants: tuple[tuple[str, ...], ...] = (
        ("train.expert_lr=1e-4",), ("train.expert_lr=2e-4",), ("train.expert_lr=3e-4",))


def _variants(name: str, parent: Run, settings, progress: bool) -> dict:
    """Final held-out perplexity of each variant of the probe schedule (``settings.base`` + each of
    ``settings.variants``), as the experiment ``name``."""
    domains = list(parent.corpus.domains)
    base = list(settings.base)
    with Experiment(parent, name, {"base": base, "variants": [list(v) for v in settings.variants]}) as ex:
        rows = {}
        for v in settings.variants:
            vname = variant_name(v)
            say(f"[{name}] {variant_name(base)} + {vname}")
            rows[vname] = ex.part(vname, lambda v=v, vname=vname: run_variant(
                parent, ex.path("runs", vname), base + list(v), progress=progress))
        return _finish(ex, rows, domains, f"expert tuning on the probe schedule ({variant_name(base)})")


@EXPERIMENTS.register("ablate_lr", AblateLrSettings)
def ablate_lr(parent: Run, settings, *, progress: bool = True) -> dict:
    """Final held-out perplexity of each variant of the probe schedule (settings: AblateLrSettings)."""
    return _variants("ablate_lr", parent, settings, progress)


@dataclasses.dataclass(frozen=True)
class AblateQualitySettings:
    """The quality levers of expert tuning on the parent's schedule, one variant each: the tied embedding / head
    tuned too (the paper's; the default keeps it as extracted since this experiment measured that better), and
    distillation from the dense parent mixed with the LM loss. Earlier defaults measured the refit (now on) and
    pure distillation (worse on every domain; README)."""
    base: tuple[str, ...] = ()
    variants: tuple[tuple[str, ...], ...] = (("train.freeze_embedding=false",), ("train.expert_loss=mix",))


@EXPERIMENTS.register("ablate_quality", AblateQualitySettings)
def ablate_quality(parent: Run, settings, *, progress: bool = True) -> dict:
    """Final held-out perplexity of the default schedule with each quality lever (AblateQualitySettings)."""
    return _variants("ablate_quality", parent, settings, progress)


@dataclasses.dataclass(frozen=True)
class AblateBudgetSettings:
    """Where a faster expert step's freed time goes: the parent's schedule with more expert steps (default
    variant: 56, 1.4x the default's 40), each variant a fork that reuses everything before its expert phase.
    Measured on a 28-step parent with the variant 40: lower final perplexity on every domain (README), the
    default since."""
    base: tuple[str, ...] = ()
    variants: tuple[tuple[str, ...], ...] = (("train.expert_steps=56",),)


@EXPERIMENTS.register("ablate_budget", AblateBudgetSettings)
def ablate_budget(parent: Run, settings, *, progress: bool = True) -> dict:
    """Final held-out perplexity and phase time of each expert-budget variant (AblateBudgetSettings)."""
    return _variants("ablate_budget", parent, settings, progress)


def split_overrides(parent: Run, rounds: int) -> tuple[list[str], dict]:
    """The overrides of the equal-wall-time split and how they were derived from the parent's timings."""
    t = parent.cfg.train
    if rounds >= t.rounds:
        raise ValueError(f"ablate_split.rounds={rounds}: must be fewer than the parent's train.rounds={t.rounds}")
    secs = phase_seconds(parent)
    freed = sum(secs.get(f"router_{r}", 0.0) for r in range(rounds, t.rounds))
    per_expert_step = steady_step_seconds(parent, "expert")
    extra = int(round(freed / per_expert_step))
    steps = -(-(t.rounds * t.expert_steps + extra) // rounds)
    why = {"router_seconds_freed": round(freed, 1), "expert_step_seconds": round(per_expert_step, 2),
           "extra_expert_steps": extra, "expert_steps_per_round": steps}
    return [f"train.rounds={rounds}", f"train.expert_steps={steps}"], why


@dataclasses.dataclass(frozen=True)
class AblateSplitSettings:
    """Router steps vs expert steps at equal wall time: ``rounds`` round(s) whose expert phases get every
    expert step of the parent plus the steps that the parent's later router rounds' measured wall time buys
    (at the parent's median expert-step time)."""
    rounds: int = 1
    overrides: tuple[str, ...] = ()      # further overrides of the variant (e.g. the best ablate_lr setting)


@EXPERIMENTS.register("ablate_split", AblateSplitSettings)
def ablate_split(parent: Run, settings, *, progress: bool = True) -> dict:
    domains = list(parent.corpus.domains)
    overrides, why = split_overrides(parent, settings.rounds)
    overrides += list(settings.overrides)
    with Experiment(parent, "ablate_split", {"rounds": settings.rounds, "overrides": overrides, "derived": why}) as ex:
        t = parent.cfg.train
        rows = {f"{t.rounds} rounds x ({t.router_steps} router + {t.expert_steps} expert) (parent)": _parent_row(parent)}
        name = f"{settings.rounds} round(s) x ({t.router_steps} router + {why['expert_steps_per_round']} expert)"
        name += "".join(f", {o.split('.', 1)[-1]}" for o in settings.overrides)
        rows[name] = ex.part("variant", lambda: run_variant(parent, ex.path("runs", "variant"), overrides,
                                                           progress=progress))
        return _finish(ex, rows, domains, "router vs expert steps at equal wall time", {"derived": why})
