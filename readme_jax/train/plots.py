"""PNG plots of a run folder, drawn from ``metrics.jsonl`` (matplotlib, Agg backend).

    loss.png       training loss per update, one line per phase (router rounds: distillation loss,
                   expert rounds: LM loss), rounds side by side on a common step axis
    perplexity.png held-out perplexity per domain at each evaluation (dense parent, router_0, expert_r, final)
    load.png       share of each domain's held-out tokens routed to each expert (last evaluation)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from readme_jax.train.metrics_log import MetricsLog


def _save(fig, path: Path) -> Path:
    """Lay out, write at 110 dpi and close ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write the plots of ``run_dir`` into ``run_dir/plots``; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = MetricsLog(run_dir / "metrics.jsonl").records()
    written = []

    steps = [r for r in records if r.get("event") == "step"]
    if steps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, kind, title in ((axes[0], "router", "router rounds: distillation loss"),
                                (axes[1], "expert", "expert rounds: LM loss")):
            offset = 0
            for phase in sorted({r["phase"] for r in steps if r["kind"] == kind}, key=lambda p: int(p.split("_")[1])):
                rs = [r for r in steps if r["phase"] == phase]
                x = [offset + r["step"] for r in rs]
                ax.plot(x, [r["loss"] for r in rs], marker=".", label=f"round {phase.split('_')[1]}")
                offset = x[-1]
            ax.set_title(title)
            ax.set_xlabel("update (cumulative)")
            ax.set_ylabel("loss")
            ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "loss.png"))

    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        tags = [r["tag"] for r in evals]
        domains = list(evals[0]["ppl"])
        fig, ax = plt.subplots(figsize=(7, 4))
        for d in domains:
            ax.plot(tags, [r["ppl"][d]["ppl"] for r in evals], marker="o", label=d)
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("perplexity per domain per evaluation")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "perplexity.png"))

        with_load = [r for r in evals if "load" in r]
        if with_load:
            last = with_load[-1]
            mat = np.asarray([last["load"][d] for d in domains])
            fig, ax = plt.subplots(figsize=(1.2 * mat.shape[1] + 2.5, 0.6 * len(domains) + 1.8))
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(mat.shape[1]), [f"e{e}" for e in range(mat.shape[1])])
            ax.set_yticks(range(len(domains)), domains)
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center",
                            color="white" if mat[i, j] < 0.6 else "black", fontsize=8)
            ax.set_xlabel("expert")
            ax.set_title(f"expert load per domain ({last['tag']})")
            fig.colorbar(im, ax=ax, fraction=0.046)
            written.append(_save(fig, out_dir / "load.png"))
    return written
