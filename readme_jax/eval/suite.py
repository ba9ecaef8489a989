"""The evaluation suite: several models on the same held-out draws, every difference with a 95% CI.

    python -m readme_jax.eval.suite --model dense=smollm2 --model readme=runs/default/export \\
        --corpus runs/default/corpus --out runs/default/eval_suite [--ppl-tokens 16384 --seed 0 ...]

(``python -m readme_jax.science evaluate`` runs it on a finished run's models.) The first model is the
reference (the dense parent). Parts:

* **ppl**: held-out perplexity on >= ``ppl_tokens`` tokens per domain of whole documents drawn with the seed
  across the held-out split (:mod:`readme_jax.eval.sampler`), a 95% bootstrap CI per model and the paired
  bootstrap CI of the per-token NLL difference (= the perplexity ratio) between every two models
  (:mod:`readme_jax.eval.window_scores`).
* **agreement**: top-1 next-token agreement with the reference on the same tokens, per domain, with CI.
* **mc**: the built-in multiple-choice task (:func:`readme_jax.eval.mc_tasks.builtin_items`,
  ``mc_items_per_domain`` per domain), accuracy with CI, McNemar and a paired bootstrap against the reference.
* **cloze**: the committed cloze set (:mod:`readme_jax.eval.cloze`), "kept n of m".

Writes ``OUT/eval/{ppl,agreement,mc,cloze}.json``, ``OUT/eval/summary.md`` and ``OUT/eval/ppl_ratio.png``.
Every model must share the reference's tokenizer (per-token NLLs are compared position by position).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from readme_jax.atomic import atomic_write_json
from readme_jax.data.corpus import Corpus, load_corpus, tokenizer_fingerprint
from readme_jax.eval import cloze as cloze_lib
from readme_jax.eval import sampler, window_scores
from readme_jax.eval.mc_tasks import MCItem, builtin_items
from readme_jax.eval.model_specs import load_model, parse_model
from readme_jax.eval.multiple_choice import ItemResult, correct_flags, evaluate_items, summarize
from readme_jax.eval.paired import bootstrap_mean, compare_models

PARTS = ("ppl", "mc", "cloze")

ModelLoader = Callable[[], tuple[Any, Any]]          # () -> (model, tokenizer)
Cache = Callable[[str, Callable[[], dict]], dict]    # (name, compute) -> JSON-able result


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """The suite's budgets (also the ``evaluate`` section of the science settings)."""
    ppl_tokens: int = 16384              # held-out tokens per domain, whole documents
    seq_len: int = 512
    batch: int = 4
    seed: int = 0                        # document draw, multiple-choice items and bootstrap
    mc_items_per_domain: int = 120
    mc_context_tokens: int = 64
    mc_continuation_tokens: int = 24
    mc_batch: int = 8
    cloze_batch: int = 16
    bootstrap: int = 10000
    parts: tuple[str, ...] = PARTS

    def __post_init__(self):
        for k in ("ppl_tokens", "seq_len", "batch", "mc_items_per_domain", "mc_context_tokens",
                  "mc_continuation_tokens", "mc_batch", "cloze_batch", "bootstrap"):
            if getattr(self, k) < 1:
                raise ValueError(f"evaluate.{k} must be >= 1, got {getattr(self, k)}")
        bad = sorted(set(self.parts) - set(PARTS))
        if bad or not self.parts:
            raise ValueError(f"evaluate.parts {list(self.parts)}: expected a non-empty subset of {list(PARTS)}")


@dataclasses.dataclass(frozen=True)
class SuitePlan:
    """What every model is scored on: the drawn windows per domain, the MC items, the cloze items."""
    settings: SuiteSettings
    samples: dict[str, sampler.DomainSample]
    mc_items: list[MCItem]
    cloze_items: list[cloze_lib.ClozeItem]


def make_plan(corpus: Corpus, tokenizer, settings: SuiteSettings, *, domains: Sequence[str] | None = None,
              cloze_path: str | Path | None = None) -> SuitePlan:
    s = settings
    domains = list(domains or corpus.domains)
    samples = {d: sampler.sample_domain(corpus, d, tokenizer, min_tokens=s.ppl_tokens, seq_len=s.seq_len,
                                        seed=s.seed) for d in domains} if "ppl" in s.parts else {}
    mc = builtin_items(corpus, tokenizer, items_per_domain=s.mc_items_per_domain, context_tokens=s.mc_context_tokens,
                       continuation_tokens=s.mc_continuation_tokens, seed=s.seed,
                       domains=domains) if "mc" in s.parts else []
    cz = cloze_lib.load_items(cloze_path) if "cloze" in s.parts else []
    return SuitePlan(s, samples, mc, cz)


def score_model(model, tokenizer, plan: SuitePlan, *, label: str = "", progress: bool = True) -> dict:
    """One model's raw scores (JSON-able): ``{"ppl": {domain: window scores}, "mc": [item results],
    "cloze": {...}, "seconds": {part: s}}``."""
    s, out, seconds = plan.settings, {}, {}
    if plan.samples:
        t0 = time.perf_counter()
        fn = window_scores.make_window_fn(model)
        out["ppl"] = {d: window_scores.score_sample(fn, smp, batch_size=s.batch,
                                                    desc=f"ppl {label} {d}" if progress else None)
                      for d, smp in plan.samples.items()}
        seconds["ppl"] = time.perf_counter() - t0
    if plan.mc_items:
        t0 = time.perf_counter()
        out["mc"] = [r.to_json() for r in evaluate_items(model, tokenizer, plan.mc_items, batch_size=s.mc_batch,
                                                         desc=f"mc {label}" if progress else None)]
        seconds["mc"] = time.perf_counter() - t0
    if plan.cloze_items:
        t0 = time.perf_counter()
        out["cloze"] = cloze_lib.score_cloze(model, tokenizer, plan.cloze_items, batch_size=s.cloze_batch,
                                             desc=f"cloze {label}" if progress else None)
        seconds["cloze"] = time.perf_counter() - t0
    out["seconds"] = seconds
    return out


def _say(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(msg)


# ------------------------------------------------------------------------------------ statistics
def compare(raw: Mapping[str, dict], plan: SuitePlan, reference: str) -> dict:
    """Every part's statistics from the models' raw scores (``reference``: the label of the dense parent)."""
    s, names = plan.settings, list(raw)
    boot = {"samples": s.bootstrap, "seed": s.seed}
    res: dict[str, Any] = {"reference": reference, "models": names,
                           "seconds": {n: raw[n].get("seconds", {}) for n in names}}
    if plan.samples:
        res["ppl"] = {
            "draw": {d: sampler.describe(smp) for d, smp in plan.samples.items()},
            "models": {n: {d: window_scores.perplexity_ci(raw[n]["ppl"][d], **boot) for d in plan.samples}
                       for n in names},
            "pairs": [{"a": a, "b": b, "domains": {d: window_scores.nll_difference(raw[a]["ppl"][d], raw[b]["ppl"][d],
                                                                                     **boot) for d in plan.samples}}
                      for b, a in itertools.combinations(names, 2)]}   # a - b, a listed after b
        res["agreement"] = {n: {d: window_scores.top1_agreement(raw[n]["ppl"][d], raw[reference]["ppl"][d],
                                                                smp.weights, **boot)
                                for d, smp in plan.samples.items()} for n in names if n != reference}
    if plan.mc_items:
        results = {n: [ItemResult.from_json(r) for r in raw[n]["mc"]] for n in names}
        flags = {n: correct_flags(v) for n, v in results.items()}
        res["mc"] = {"items": len(plan.mc_items), "chance": 0.25,
                     "models": {n: {**summarize(v), "acc_ci": bootstrap_mean(flags[n], **boot)}
                                for n, v in results.items()},
                     "vs_reference": compare_models(flags, reference, bootstrap_samples=s.bootstrap, seed=s.seed)}
    if plan.cloze_items:
        res["cloze"] = {"items": [it.to_json() for it in plan.cloze_items],
                        "models": {n: raw[n]["cloze"] for n in names}}
    return res


def run_suite(models: Mapping[str, ModelLoader], corpus: Corpus | str | Path, out_dir: str | Path,
              settings: SuiteSettings = SuiteSettings(), *, domains: Sequence[str] | None = None,
              cloze_path: str | Path | None = None, cache: Cache | None = None, progress: bool = True) -> dict:
    """Score ``models`` (label -> loader, the first the reference; loaded one at a time) and write the report."""
    from readme_jax.eval.suite_report import write_report
    if not models:
        raise ValueError("evaluation suite: no models")
    corpus = load_corpus(corpus)
    cache = cache or (lambda name, compute: compute())
    t0 = time.perf_counter()
    plan, fingerprint, raw = None, None, {}
    for label, load in models.items():
        model, tokenizer = load()
        if tokenizer is None:
            raise ValueError(f"model {label!r}: no tokenizer found with the model")
        fp = tokenizer_fingerprint(tokenizer)
        if plan is None:
            plan, fingerprint = make_plan(corpus, tokenizer, settings, domains=domains, cloze_path=cloze_path), fp
        elif fp != fingerprint:
            raise ValueError(f"model {label!r}: its tokenizer differs from {next(iter(models))!r}'s; the suite "
                             "compares per-token scores and needs one tokenizer")
        _say(f"[evaluate] scoring {label}", progress)
        raw[label] = cache(f"model_{label}", lambda: score_model(model, tokenizer, plan, label=label,
                                                                 progress=progress))
        del model
    result = compare(raw, plan, next(iter(models)))
    result["settings"] = dataclasses.asdict(settings)
    result["wall_seconds"] = time.perf_counter() - t0
    write_report(Path(out_dir), result)
    return result


# --------------------------------------------------------------------------------------------- CLI
def raw_cache(folder: Path, key: dict) -> Cache:
    """A :data:`Cache` of each model's raw scores in ``folder/<name>.json``, reused by a rerun whose ``key``
    (settings, corpus, domains, that model's source) is the same, recomputed otherwise (so a killed run resumes
    after the last finished model)."""
    def cache(name: str, compute: Callable[[], dict]) -> dict:
        label = name.removeprefix("model_")
        record_key = {**{k: v for k, v in key.items() if k != "models"}, "model": key["models"].get(label)}
        path = folder / f"{name}.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("key") == json.loads(json.dumps(record_key)):
                tqdm.write(f"[evaluate] {label}: reused {path}")
                return old["scores"]
        scores = compute()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": record_key, "scores": scores})
        return scores
    return cache


def _parser() -> argparse.ArgumentParser:
    d = SuiteSettings()
    p = argparse.ArgumentParser(prog="python -m readme_jax.eval.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH[@DTYPE]",
                   help="'smollm2' or anything load_pretrained loads; repeat; the first is the reference")
    p.add_argument("--corpus", required=True, type=Path, help="corpus built by readme_jax.data.corpus")
    p.add_argument("--out", required=True, type=Path, help="folder; results go to OUT/eval/")
    p.add_argument("--domains", nargs="+")
    p.add_argument("--cloze-items", type=Path, help="a cloze set (default: the committed one)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(SuiteSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "parts":
            p.add_argument(flag, nargs="+", choices=PARTS, default=list(d.parts))
        else:
            p.add_argument(flag, type=int, default=getattr(d, f.name))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = SuiteSettings(**{f.name: (tuple(getattr(args, f.name)) if f.name == "parts" else getattr(args, f.name))
                                    for f in dataclasses.fields(SuiteSettings)})
        parsed = [parse_model(m) for m in args.model]
        labels = [p[0] for p in parsed]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--model labels repeat: {labels}; name them LABEL=PATH")
        for _, spec, _ in parsed:
            if spec != "smollm2" and not Path(spec).exists():
                raise ValueError(f"{spec}: no such model file or folder")
        if not args.corpus.is_dir():
            raise ValueError(f"{args.corpus}: no such corpus folder")
        models = {label: (lambda spec=spec, dtype=dtype: load_model(spec, dtype)[1:]) for label, spec, dtype in parsed}
        key = {"settings": dataclasses.asdict(settings), "corpus": str(args.corpus.resolve()), "domains": args.domains,
               "cloze_items": str(args.cloze_items), "models": {label: [spec, dtype] for label, spec, dtype in parsed}}
        result = run_suite(models, args.corpus, args.out, settings, domains=args.domains, cloze_path=args.cloze_items,
                           cache=raw_cache(args.out / "eval" / "raw", key), progress=not args.no_progress)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    print((args.out / "eval" / "summary.md").read_text())
    print(f"[evaluate] {result['wall_seconds']:.0f} s -> {args.out / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
