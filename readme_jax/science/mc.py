"""Multiple-choice accuracy of the dense parent, Read-ME and the baselines, with paired tests against Read-ME.

The built-in task (:func:`readme_jax.eval.mc_tasks.builtin_items`: a held-out passage's true continuation among
three from other passages of its domain; chance 25%) and, when ``mc.mmlu_dir`` names an MMLU-format folder,
MMLU with ``mc.k_shot`` examples. Models: the dense parent, Read-ME (tuned), and the equal-size dense and
layer-wise baselines when their experiments have run. Every model sees the same items; differences are
judged by McNemar's exact test on the paired per-item outcomes.

    python -m readme_jax.science mc --run-dir runs/default
"""

from __future__ import annotations

import dataclasses

from readme_jax.eval.mc_tasks import builtin_items, mmlu_items
from readme_jax.eval.multiple_choice import ItemResult, correct_flags, evaluate_items, summarize
from readme_jax.eval.paired import compare_models
from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train.run import say

REFERENCE = "Read-ME"


def _models(run, ex_root):
    """{name: loader} of the models to score (baselines only when their experiment left a model)."""
    out = {"dense parent": lambda: run.dense, REFERENCE: run.trained_model}
    base = ex_root / "dense_baseline" / "model"
    if (base / "config.json").is_file():
        from readme_jax.convert.load import load_pretrained
        out["equal-size dense"] = lambda: load_pretrained(base, dtype=None)[0]
    routers = ex_root / "layerwise" / "routers.npz"
    if routers.is_file():
        from readme_jax.science.layerwise import LayerwiseMoE, load_routers
        out["layer-wise MoE"] = lambda: LayerwiseMoE(run.trained_model(), load_routers(routers)[0])
    return out


@dataclasses.dataclass(frozen=True)
class MCSettings:
    """The built-in multiple-choice task (and an optional MMLU-format folder)."""
    items_per_domain: int = 24
    context_tokens: int = 64
    continuation_tokens: int = 24
    seed: int = 0
    batch: int = 8
    mmlu_dir: str | None = None          # a folder of MMLU-format <subject>_test.csv / _dev.csv files
    k_shot: int = 5


@EXPERIMENTS.register("mc", MCSettings)
def mc(parent, settings, *, progress: bool = True) -> dict:
    run = parent
    s = settings
    with Experiment(run, "mc", {"items_per_domain": s.items_per_domain, "context_tokens": s.context_tokens,
                                "continuation_tokens": s.continuation_tokens, "seed": s.seed,
                                "mmlu_dir": s.mmlu_dir, "k_shot": s.k_shot}) as ex:
        tasks = {"built-in": builtin_items(run.corpus, run.tokenizer, items_per_domain=s.items_per_domain,
                                           context_tokens=s.context_tokens,
                                           continuation_tokens=s.continuation_tokens, seed=s.seed)}
        if s.mmlu_dir:
            tasks["mmlu"] = mmlu_items(s.mmlu_dir, k_shot=s.k_shot)
        models = _models(run, ex.dir.parent)
        result, tables = {"tasks": {}}, []
        for task, items in tasks.items():
            per_model = {}
            for name, load in models.items():
                say(f"[mc] {task}: {name} ({len(items)} items)")
                per_model[name] = ex.part(f"{task}_{name.replace(' ', '_')}", lambda load=load: [
                    r.to_json() for r in evaluate_items(load(), run.tokenizer, items, batch_size=s.batch,
                                                        desc=f"mc {task}" if progress else None)])
            results = {n: [ItemResult.from_json(r) for r in v] for n, v in per_model.items()}
            summaries = {n: summarize(v) for n, v in results.items()}
            cmp = {norm: compare_models({n: correct_flags(v, norm=norm == "acc_norm") for n, v in results.items()},
                                        REFERENCE) for norm in ("acc", "acc_norm")}
            groups = list(next(iter(summaries.values()))["groups"])
            rows = []
            for n, sm in summaries.items():
                c = {m: next(r for r in cmp[m] if r["model"] == n) for m in cmp}
                rows.append([n, *[sm["groups"][g]["acc"] for g in groups], sm["overall"]["acc"], sm["overall"]["acc_norm"],
                             "-" if n == REFERENCE else f"p={c['acc']['p_value']:.3f} ({c['acc']['verdict']})"])
            tables.append(f"**{task}** ({len(items)} items, {sum(1 for _ in groups)} groups)\n\n" + markdown_table(
                ["model", *groups, "acc", "acc_norm", f"vs {REFERENCE} (McNemar, acc)"], rows))
            grouped_bars({n: {**{g: sm["groups"][g]["acc"] for g in groups}, "overall": sm["overall"]["acc"]}
                          for n, sm in summaries.items()}, ex.path(f"{task}.png"),
                         title=f"multiple-choice accuracy: {task}", ylabel="acc")
            result["tasks"][task] = {"summaries": summaries, "comparisons": cmp, "items": len(items)}
        ex.finish(result, "\n\n".join(tables) + f"\n\nChance 25% on the built-in task (seed {s.seed}).")
        return result

