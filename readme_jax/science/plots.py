"""The science experiments' pictures (matplotlib, Agg; every PNG written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from readme_jax.atomic import atomic_file


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def grouped_bars(values: Mapping[str, Mapping[str, float]], path: Path, *, title: str, ylabel: str,
                 log: bool = False, intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                 hline: float | None = None) -> Path:
    """Bars of ``values[series][group]`` grouped by group (e.g. perplexity per domain per model); with
    ``intervals[series][group] = (low, high)`` an error bar each (e.g. a 95% CI), with ``hline`` a dashed
    reference line (e.g. ratio 1)."""
    plt = _plt()
    series = list(values)
    groups = list(next(iter(values.values())))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        y = np.array([values[s][g] for g in groups], np.float64)
        err = None
        if intervals is not None:
            lo_hi = np.array([intervals[s][g] for g in groups], np.float64)        # [groups, 2]
            err = np.stack([y - lo_hi[:, 0], lo_hi[:, 1] - y])
        ax.bar(x + (i - (len(series) - 1) / 2) * width, y, width, label=s, yerr=err, capsize=3 if err is not None else 0)
    if hline is not None:
        ax.axhline(hline, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def lines(xs: Sequence[float], ys: Mapping[str, Sequence[float]], path: Path, *, title: str, xlabel: str,
          ylabel: str, logx: bool = False, logy: bool = False) -> Path:
    """One line per series over the same ``xs``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, y in ys.items():
        ax.plot(xs, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def domain_curves(curves: Mapping[str, Sequence[Mapping]], dense: Mapping[str, float], path: Path, *,
                  goal_ratio: float) -> Path:
    """One panel per domain: each series' perplexity over wall clock (``curves[series]`` = points
    ``{"seconds", "ppl": {domain: ppl}}``), the dense parent's perplexity solid and ``goal_ratio`` x it dashed."""
    plt = _plt()
    domains = list(dense)
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.4), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for name, pts in curves.items():
            ax.plot([p["seconds"] / 60 for p in pts], [p["ppl"][d] for p in pts], marker="o", label=name)
        ax.axhline(dense[d], color="k", linewidth=0.8, label="dense parent")
        ax.axhline(goal_ratio * dense[d], color="k", linestyle="--", linewidth=0.8, label=f"{goal_ratio}x dense")
        ax.set_yscale("log")
        ax.set_title(d, fontsize=10)
        ax.set_xlabel("main job wall clock (min)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def heatmaps(mats: Mapping[str, np.ndarray], path: Path, *, title: str, labels: Sequence[str] | None = None) -> Path:
    """A row of row-normalised heatmaps (e.g. P(expert at l+1 | expert at l) for a few depths)."""
    plt = _plt()
    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        m = np.asarray(m, np.float64)
        p = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(p, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
