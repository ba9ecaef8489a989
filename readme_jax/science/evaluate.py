"""The evaluation suite on a finished run's models (:mod:`readme_jax.eval.suite`), outside the timed main job.

Models: the dense parent (the reference), Read-ME (tuned), and the equal-size dense baseline when its experiment
has left a model. Each model's raw scores are a part (resumable); the statistics, ``eval/*.json``,
``eval/summary.md`` and ``eval/ppl_ratio.png`` are remade from them.

    python -m readme_jax.science evaluate --run-dir runs/default [evaluate.ppl_tokens=32768 ...]
"""

from __future__ import annotations

from readme_jax.config.loader import plain
from readme_jax.eval.suite import SuiteSettings, run_suite
from readme_jax.eval.suite_report import summary
from readme_jax.science.folder import Experiment
from readme_jax.science.settings import EXPERIMENTS

REFERENCE = "dense parent"


@EXPERIMENTS.register("evaluate", SuiteSettings)
def evaluate(parent, settings, *, progress: bool = True) -> dict:
    run = parent
    with Experiment(run, "evaluate", plain(settings)) as ex:
        models = {REFERENCE: lambda: (run.dense, run.tokenizer), "Read-ME": lambda: (run.trained_model(), run.tokenizer)}
        base = ex.dir.parent / "dense_baseline" / "model"
        if (base / "config.json").is_file():
            from readme_jax.convert.load import load_pretrained
            models["equal-size dense"] = lambda: (load_pretrained(base, dtype=None)[0], run.tokenizer)
        result = run_suite(models, run.corpus, ex.dir, settings, cache=ex.part, progress=progress)
        ppl = result.get("ppl", {})
        headline = {"models": result["models"], "wall_seconds": result["wall_seconds"], "files": "eval/",
                    "ppl": {m: {d: r["ppl"] for d, r in doms.items()} for m, doms in ppl.get("models", {}).items()},
                    "mc_acc": {m: s["overall"]["acc"] for m, s in result.get("mc", {}).get("models", {}).items()},
                    "cloze": {m: [r["answered"], r["items"]] for m, r in result.get("cloze", {}).get("models", {}).items()}}
        ex.finish(headline, summary(result))
        return result
