"""The co-design measured on this CPU: expert-aware batching vs decode-first in the real engine.

Real compute, SmolLM2-based Read-ME (a default-run export), 32 slots, a token budget of 8 (running decode tokens
= 4x the budget, so the scheduler has a choice), the same requests (held-out text of every domain, short
prompts, fixed outputs, EOS off), greedy. Every expert stays resident (k = E): what expert-aware batching saves
is the FFN weights of the experts a step does not use, which the decode dispatcher never reads. Both policies
run in one process, interleaved (A, B, A, B), compiles shared and excluded. Reported: ms per output token
(wall time of the whole request set / output tokens), distinct experts per decode step, and whether the tokens
are identical; PNG: measured decode-step time vs distinct experts.

    python -m benchmarks.codesign_engine [--quick] [--export DIR] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import error_row, make_row

NAME = "codesign_cpu"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = ROOT / "runs" / "default" / "export"
DEFAULT_OUT = ROOT / "runs" / "codesign"


def requests(export: Path, corpus: Path | None, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``prompt_len`` tokens from the held-out split of every domain, round-robin."""
    from readme_jax.convert.load import load_pretrained
    from readme_jax.data.corpus import load_corpus
    from readme_jax.eval.perplexity import heldout_windows
    _, tok = load_pretrained(export, dtype=None)
    c = load_corpus(corpus or export.parent / "corpus")
    per = -(-n // len(c.domains))
    out = []
    for d in c.domains:
        ids, _ = heldout_windows(c, d, tok, seq_len=prompt_len, max_tokens=prompt_len * per * 3)
        rng = np.random.default_rng(seed)
        out.append([ids[i].tolist() for i in rng.choice(len(ids), per, replace=False)])
    return [out[i % len(out)][i // len(out)] for i in range(n)]


def serve_all(engine, prompts, max_tokens):
    from readme_jax.sampling import SamplingParams
    engine.step_log.clear()
    t0 = time.perf_counter()
    streams = [engine.submit(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    toks = [[t for o in s for t in o.token_ids] for s in streams]
    wall = time.perf_counter() - t0
    steps = [e for e in engine.step_log if e["decode_tokens"]]
    return toks, wall, steps


def run(quick: bool = False, *, export: str | Path = DEFAULT_EXPORT, corpus: str | Path | None = None,
        out: str | Path = DEFAULT_OUT) -> list[dict]:
    import jax.numpy as jnp

    from readme_jax.convert.load import load_pretrained
    from readme_jax.serve.engine import Engine, EngineConfig
    from readme_jax.serve.schedulers import SCHEDULERS
    export, out = Path(export), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case = "32 slots, budget 8, k = E, greedy"
    try:
        model, _ = load_pretrained(export, dtype=jnp.float32)
        slots, budget, n_out = 32, 8, (16 if quick else 48)
        prompts = requests(export, None if corpus is None else Path(corpus), slots, 8)
        engines = {name: Engine(model, None, EngineConfig(max_num_seqs=slots, max_num_batched_tokens=budget,
                                                          max_model_len=8 + n_out + 8, min_token_bucket=8,
                                                          max_queue=slots, scheduler=name,
                                                          scheduler_options=tuple(SCHEDULERS.own_options(name, {"max_wait": 8}).items())))
                   for name in ("decode-first", "expert-aware")}
        t0 = time.perf_counter()
        for e in engines.values():
            e.start()
        warm = time.perf_counter() - t0
        res = {k: [] for k in engines}
        for _ in range(1 if quick else 2):
            for name, e in engines.items():
                res[name].append(serve_all(e, prompts, n_out))
        for e in engines.values():
            e.shutdown(5)
    except Exception as exc:  # noqa: BLE001
        return [error_row(NAME, case, exc)]
    total = slots * n_out
    ms = {k: min(w for _, w, _ in v) / total * 1e3 for k, v in res.items()}
    distinct = {k: float(np.mean([s["distinct_experts"] for s in v[0][2]])) for k, v in res.items()}
    same = res["decode-first"][0][0] == res["expert-aware"][0][0]
    step_ms = {k: float(np.median([s["seconds"] for s in v[-1][2]])) * 1e3 for k, v in res.items()}
    rows = [make_row(NAME, f"{case}: expert-aware vs decode-first, ms per output token", ms["expert-aware"],
                     ms["decode-first"], "ms/tok", higher_is_better=False, goal=1.0 / 0.85,
                     note=f"distinct experts per decode step {distinct['expert-aware']:.2f} vs "
                          f"{distinct['decode-first']:.2f}; median decode step {step_ms['expert-aware']:.0f} vs "
                          f"{step_ms['decode-first']:.0f} ms; tokens identical: {same}; compile+warm-up {warm:.0f} s "
                          f"(excluded); goal = 15% lower")]
    points = [(s["distinct_experts"], s["seconds"] * 1e3) for v in res.values() for run_ in v for s in run_[2]
              if s["decode_tokens"] == budget]
    (out / "codesign_cpu.json").write_text(json.dumps({"ms_per_token": ms, "distinct": distinct, "same_tokens": same,
                                                       "step_ms": step_ms, "points": points, "rows": rows}, indent=1))
    _plot(points, out / "step_time_vs_distinct.png")
    return rows


def _plot(points, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not points:
        return
    d, t = np.array(points).T
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in sorted(set(d.astype(int))):
        ax.boxplot(t[d == k], positions=[k], widths=0.5)
    ax.set_xlabel("distinct experts in the decode step (8 tokens)")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title("Read-ME decode step on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codesign_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    from benchmarks.runner import print_table
    print_table(run(a.quick, export=a.export, corpus=a.corpus, out=a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
