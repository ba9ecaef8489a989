"""Paired comparisons of two models scored on the same items (N items, per-item correct flags).

    mcnemar(correct_a, correct_b)           # exact two-sided McNemar: {"b01", "b10", "p_value"}
    paired_bootstrap(correct_a, correct_b)  # {"diff", "ci_low", "ci_high", "p_value"} of acc_a - acc_b
    paired_bootstrap(nll_a, nll_b, weights=tokens)   # per-token NLL difference, resampling windows
    bootstrap_mean(values, weights=tokens)  # {"mean", "ci_low", "ci_high"} of one model's (weighted) mean
    compare_models({"dense": c0, "moe": c1}, reference="dense")  # one row per model

Two models on the same N items are not independent samples: the test that respects the pairing looks only
at the discordant items (one right, the other wrong). ``b01`` counts items A gets wrong and B right, ``b10``
the reverse; under "same accuracy" each discordant item is a fair coin, so ``p = binomtest(b10, b01 + b10,
0.5)`` (two-sided, exact).

The bootstraps resample units (items, or windows of tokens) with replacement; with ``weights`` (e.g. the tokens
of each window, values being per-window means) a resample's statistic is ``sum(w * v) / sum(w)`` over the
drawn units, so a per-token mean is estimated while whole windows are resampled (tokens of one window are not
independent). Dimension names: N units, S resamples.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import binomtest

ALPHA = 0.05


def _pair(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, bool).reshape(-1), np.asarray(correct_b, bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items: {a.size} vs {b.size} flags")
    if a.size == 0:
        raise ValueError("paired comparison of 0 items")
    return a, b


def mcnemar(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test. correct_a, correct_b: bool[N] (item i right under model A / B).

    Returns ``{"b01": #(A wrong, B right), "b10": #(A right, B wrong), "p_value"}``; p = 1.0 when no item
    is discordant.
    """
    a, b = _pair(correct_a, correct_b)
    b01, b10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    p = 1.0 if b01 + b10 == 0 else float(binomtest(b10, b01 + b10, 0.5).pvalue)
    return {"b01": b01, "b10": b10, "p_value": min(1.0, p)}


def _values(values, weights) -> tuple[np.ndarray, np.ndarray | None]:
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap of 0 units")
    if weights is None:
        return v, None
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != v.shape:
        raise ValueError(f"bootstrap weights: {w.size} for {v.size} values")
    if np.any(w < 0) or not np.sum(w) > 0:
        raise ValueError("bootstrap weights must be >= 0 with a positive sum")
    return v, w


def _resampled_means(v: np.ndarray, w: np.ndarray | None, samples: int, seed: int, chunk: int) -> np.ndarray:
    """float64[S]: the (weighted) mean of ``v`` [N] over ``samples`` resamples of N unit indices with
    replacement, drawn in chunks of ``chunk`` resamples from ``np.random.default_rng(seed)``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, samples, chunk):
        idx = rng.integers(0, v.size, size=(min(chunk, samples - i), v.size))    # [chunk, N]
        if w is None:
            out.append(v[idx].mean(axis=1))
        else:
            ws = w[idx]
            total = ws.sum(axis=1)
            out.append(np.where(total > 0, (ws * v[idx]).sum(axis=1) / np.where(total > 0, total, 1), np.nan))
    means = np.concatenate(out)
    return means[~np.isnan(means)]


def _mean(v: np.ndarray, w: np.ndarray | None) -> float:
    return float(v.mean() if w is None else np.sum(w * v) / np.sum(w))


def bootstrap_mean(values, *, weights=None, samples: int = 10000, seed: int = 0, chunk: int = 1000) -> dict:
    """Percentile bootstrap of the (weighted) mean of ``values`` float[N] (``weights`` float[N] or None).

    Returns ``{"mean": observed, "ci_low", "ci_high": 95% percentile interval, "n": N}``; resamples whose
    weights sum to 0 are dropped.
    """
    v, w = _values(values, weights)
    means = _resampled_means(v, w, samples, seed, chunk)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": _mean(v, w), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def paired_bootstrap(correct_a, correct_b, *, weights=None, samples: int = 10000, seed: int = 0,
                     chunk: int = 1000) -> dict:
    """Paired bootstrap of ``mean_a - mean_b`` over units. correct_a, correct_b: bool[N] (accuracy) or
    float[N] (e.g. per-window mean NLL, with ``weights`` the tokens per window).

    Each of ``samples`` resamples draws N unit indices with replacement (the same for both models).
    Returns ``{"diff": observed, "ci_low", "ci_high": 95% percentile interval, "p_value"}``, p being twice
    the share of resampled diffs on the other side of 0 from the observed one (0 included), capped at 1
    (1.0 when the observed diff is 0).
    """
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items: {a.size} vs {b.size} values")
    if a.size == 0:
        raise ValueError("paired comparison of 0 items")
    d, w = _values(a.astype(np.float64) - b.astype(np.float64), weights)         # [N]
    diffs = _resampled_means(d, w, samples, seed, chunk)                          # [S]
    observed = _mean(d, w)
    if observed > 0:
        p = 2.0 * float(np.mean(diffs <= 0))
    elif observed < 0:
        p = 2.0 * float(np.mean(diffs >= 0))
    else:
        p = 1.0
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": min(1.0, p)}


def compare_models(correct: Mapping[str, np.ndarray], reference: str, *, alpha: float = ALPHA,
                   bootstrap_samples: int = 0, seed: int = 0) -> list[dict]:
    """One row per model (in ``correct``'s order) against ``reference``, all on the same N items.

    correct: ``{name: bool[N]}``. Row: ``{"model", "n", "acc", "diff" (acc - reference acc), "b01", "b10",
    "p_value" (McNemar), "verdict"}``; verdict is "reference", "better" / "worse" when p < alpha, else
    "within noise". With ``bootstrap_samples`` > 0 also ``"ci_low"``, ``"ci_high"`` (95%) of the diff.
    """
    if reference not in correct:
        raise ValueError(f"reference {reference!r} is not among the models {list(correct)}")
    ref = np.asarray(correct[reference], bool)
    rows = []
    for name, flags in correct.items():
        flags = np.asarray(flags, bool)
        test = mcnemar(flags, ref)   # b10: this model right, the reference wrong
        acc = float(flags.mean()) if flags.size else float("nan")
        diff = acc - float(ref.mean())
        if name == reference:
            verdict = "reference"
        elif test["p_value"] < alpha:
            verdict = "better" if diff > 0 else "worse"
        else:
            verdict = "within noise"
        row = {"model": name, "n": int(flags.size), "acc": acc, "diff": diff, **test, "verdict": verdict}
        if bootstrap_samples > 0:
            boot = paired_bootstrap(flags, ref, samples=bootstrap_samples, seed=seed)
            row.update(ci_low=boot["ci_low"], ci_high=boot["ci_high"])
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    """The rows of :func:`compare_models` as a text table."""
    width = max([5] + [len(r["model"]) for r in rows])
    ci = any("ci_low" in r for r in rows)
    lines = [f"{'model':<{width}}{'n':>7}{'acc':>8}{'diff':>9}{'b01':>6}{'b10':>6}{'p':>9}"
             + (f"{'95% CI of diff':>20}" if ci else "") + "  verdict"]
    for r in rows:
        line = (f"{r['model']:<{width}}{r['n']:>7}{r['acc']:>8.4f}{r['diff']:>+9.4f}{r['b01']:>6}{r['b10']:>6}"
                f"{r['p_value']:>9.3g}")
        if ci:
            interval = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if "ci_low" in r else ""
            line += f"{interval:>20}"
        lines.append(line + f"  {r['verdict']}")
    return "\n".join(lines)
