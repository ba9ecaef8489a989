"""The evaluation suite's files: ``eval/{ppl,agreement,mc,cloze}.json``, ``eval/summary.md``, ``eval/ppl_ratio.png``.

``write_report(out_dir, result)`` takes :func:`readme_jax.eval.suite.compare`'s result (plus ``settings`` and
``wall_seconds``); every file is written atomically. Intervals are 95% bootstrap intervals (windows for
perplexity and agreement, items for multiple choice).
"""

from __future__ import annotations

from pathlib import Path

from readme_jax.atomic import atomic_write_json, atomic_write_text

PARTS = ("ppl", "agreement", "mc", "cloze")


def _ci(value: float, low: float, high: float, fmt: str = ".3f") -> str:
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def ppl_section(result: dict) -> str:
    ref, ppl = result["reference"], result["ppl"]
    domains = list(ppl["draw"])
    others = [m for m in result["models"] if m != ref]
    vs_ref = {p["a"]: p["domains"] for p in ppl["pairs"] if p["b"] == ref}
    header = ["domain", "docs / windows / tokens", f"{ref} ppl"]
    for m in others:
        header += [f"{m} ppl", f"{m} / {ref} ratio", "CI width"]
    rows = []
    for d in domains:
        draw, r = ppl["draw"][d], ppl["models"][ref][d]
        row = [d, f"{draw['documents']} / {draw['windows']} / {draw['tokens']}", _ci(r["ppl"], r["ppl_low"], r["ppl_high"], ".2f")]
        for m in others:
            p, x = ppl["models"][m][d], vs_ref[m][d]
            row += [_ci(p["ppl"], p["ppl_low"], p["ppl_high"], ".2f"), _ci(x["ratio"], x["ratio_low"], x["ratio_high"]),
                    f"{x['ratio_high'] - x['ratio_low']:.3f}"]
        rows.append(row)
    return ("**Held-out perplexity** (whole documents drawn with the seed; 95% CI: bootstrap over windows; the "
            "ratio's CI is the paired bootstrap of the per-token NLL difference)\n\n" + _table(header, rows))


def agreement_section(result: dict) -> str:
    ref, agr = result["reference"], result["agreement"]
    domains = list(result["ppl"]["draw"])
    rows = [[d] + [_ci(agr[m][d]["agreement"], agr[m][d]["ci_low"], agr[m][d]["ci_high"]) for m in agr] for d in domains]
    return f"**Top-1 next-token agreement with {ref}** (share of the same scored tokens)\n\n" + _table(
        ["domain", *agr], rows)


def mc_section(result: dict) -> str:
    mc, ref = result["mc"], result["reference"]
    groups = list(next(iter(mc["models"].values()))["groups"])
    cmp = {r["model"]: r for r in mc["vs_reference"]}
    rows = []
    for m, s in mc["models"].items():
        a, c = s["acc_ci"], cmp[m]
        vs = "-" if m == ref else (f"{_ci(c['diff'], c['ci_low'], c['ci_high'], '+.3f')} (McNemar p={c['p_value']:.3g}, "
                                   f"{c['verdict']})")
        rows.append([m, *[f"{s['groups'][g]['acc']:.3f}" for g in groups], _ci(a["mean"], a["ci_low"], a["ci_high"]),
                     f"{a['ci_high'] - a['ci_low']:.3f}", vs])
    return (f"**Multiple choice** (built-in task, {mc['items']} items, chance {mc['chance']:.2f})\n\n"
            + _table(["model", *groups, "acc [95% CI]", "CI width", f"acc - {ref} [95% CI]"], rows))


def cloze_section(result: dict) -> str:
    cz = result["cloze"]
    rows = [[m, f"kept {r['answered']} of {r['items']}", f"{100 * r['rate']:.1f}%"] for m, r in cz["models"].items()]
    return (f"**Cloze facts the reference answers** ({len(cz['items'])} items, answer within 8 greedy tokens)\n\n"
            + _table(["model", "answered", "share"], rows))


def summary(result: dict) -> str:
    parts = [s(result) for key, s in (("ppl", ppl_section), ("agreement", agreement_section), ("mc", mc_section),
                                      ("cloze", cloze_section)) if result.get(key)]
    secs = "; ".join(f"{m} " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()) for m, s in result["seconds"].items())
    parts.append(f"Wall time {result.get('wall_seconds', 0):.0f} s ({secs}). Settings: {result.get('settings', {})}.")
    return "\n\n".join(parts) + "\n"


def ratio_plot(result: dict, path: Path) -> Path | None:
    """Per-domain perplexity of every model relative to the reference, in percent (``100 * (ratio - 1)``, 0 =
    the reference's), with the 95% paired CI; None with one model."""
    from readme_jax.science.plots import grouped_bars
    ref = result["reference"]
    pairs = {p["a"]: p["domains"] for p in result["ppl"]["pairs"] if p["b"] == ref}
    if not pairs:
        return None

    def pct(r):
        return 100.0 * (r - 1.0)

    return grouped_bars({m: {d: pct(x["ratio"]) for d, x in doms.items()} for m, doms in pairs.items()}, path,
                        title=f"held-out perplexity vs {ref} (95% paired bootstrap CI)",
                        ylabel=f"perplexity above {ref} (%)",
                        intervals={m: {d: (pct(x["ratio_low"]), pct(x["ratio_high"])) for d, x in doms.items()}
                                   for m, doms in pairs.items()}, hline=0.0)


def write_report(out_dir: Path, result: dict) -> Path:
    """Write the files under ``out_dir/eval``; returns that folder."""
    folder = Path(out_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    common = {k: result[k] for k in ("reference", "models", "settings", "seconds", "wall_seconds") if k in result}
    for key in PARTS:
        if key in result:
            atomic_write_json(folder / f"{key}.json", {**common, key: result[key]}, indent=1)
    atomic_write_text(folder / "summary.md", summary(result))
    if "ppl" in result:
        ratio_plot(result, folder / "ppl_ratio.png")
    return folder
