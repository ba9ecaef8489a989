"""The benchmark runner: ``python -m benchmarks [NAME ...] [--quick] [--out DIR]``.

Each benchmark is a module exposing ``run(quick: bool) -> list[dict]``; a row is
``{"benchmark", "case", "ours", "baseline", "unit", "ratio", "goal", "note"}`` (build it with
:func:`benchmarks.common.make_row`) with ``ratio`` > 1 meaning ours is better and ``goal`` the ratio it should
reach (or None). The runner prints one table of every row, writes ``OUT/benchmarks.json`` and
``OUT/benchmarks.png`` (ratios vs goals). A benchmark that fails to import or run becomes an error row; the
others still run.

Registering a new benchmark (e.g. ``serve``, ``serve_load``, ``codesign``): write ``benchmarks/<name>.py``
with ``run(quick)`` (time its variants with :func:`benchmarks.common.time_calls`, each variant in its own
process with :func:`benchmarks.common.run_variant`; ``quick`` = a smoke run of seconds), then add one line
``"<name>": "benchmarks.<name>"`` to :data:`REGISTRY`. ``python -m benchmarks <name> --quick`` runs it alone.
"""


from __future__ import annotations

import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

from benchmarks.common import ROW_KEYS, error_row

REGISTRY: dict[str, str] = {"dense": "benchmarks.dense", "moe": "benchmarks.moe", "ep": "benchmarks.ep",
                            "serve": "benchmarks.serve", "serve_load": "benchmarks.serve_load",
                            "serve_vllm": "benchmarks.serve_vllm", "serve_revs": "benchmarks.serve_revs", "serve_startup": "benchmarks.serve_startup",
                            "codesign": "benchmarks.codesign",
                            "codesign_cpu": "benchmarks.codesign_engine",
                            "step_roofline": "benchmarks.step_roofline", "train_step": "benchmarks.train_step",
                            "sampling_tail": "benchmarks.sampling_tail"}
DEFAULT_OUT = Path("out/benchmarks")  # git-ignored


def _normalise(row: dict, name: str) -> dict:
    out = {k: row.get(k) for k in ROW_KEYS}
    out["benchmark"] = out["benchmark"] or name
    out["case"] = "" if out["case"] is None else str(out["case"])
    out["unit"] = out["unit"] or ""
    out["note"] = out["note"] or ""
    for k in ("ours", "baseline", "ratio", "goal"):
        v = out[k]
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = None
            out[k] = None if v is None or math.isnan(v) else v
    return out


def run_benchmark(name: str, module: str, quick: bool,
                  importer: Callable[[str], object] = importlib.import_module) -> list[dict]:
    """Import ``module`` and call its ``run(quick)``; any failure becomes one error row."""
    try:
        mod = importer(module)
        rows = mod.run(quick=quick)
        rows = [_normalise(r, name) for r in rows]
        return rows or [error_row(name, "(no rows)", "run() returned no rows")]
    except Exception as e:  # noqa: BLE001 - a broken benchmark must not take the others down
        tb = traceback.format_exc(limit=3).strip().splitlines()
        where = tb[-3].strip() if len(tb) >= 3 else ""
        return [error_row(name, "(failed)", f"{type(e).__name__}: {e} [{where}]")]


def status(row: dict) -> str:
    if row["note"].startswith("ERROR"):
        return "ERROR"
    if row["goal"] is None or row["ratio"] is None:
        return ""
    return "ok" if row["ratio"] >= row["goal"] else "MISS"


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table of all rows (the same columns the rich table shows)."""
    head = ["benchmark", "case", "ours", "baseline", "unit", "ratio", "goal", "", "note"]
    body = [[r["benchmark"], r["case"], _fmt(r["ours"]), _fmt(r["baseline"]), r["unit"],
             "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
             "-" if r["goal"] is None else f">={r['goal']:.2f}x", status(r), r["note"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    widths[-1] = len(head[-1])  # the note is last and free-length
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sep = "  ".join("-" * w for w in widths[:-1]) + "  ----"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def print_table(rows: list[dict], *, title: str = "benchmarks (ratio > 1: ours better)", file=None) -> None:
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title, file=file)
        print(format_table(rows), file=file)
        return
    table = Table(title=title, show_lines=False)
    for col, just in (("benchmark", "left"), ("case", "left"), ("ours", "right"), ("baseline", "right"),
                      ("unit", "left"), ("ratio", "right"), ("goal", "right"), ("", "left"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        st = status(r)
        style = {"MISS": "red", "ERROR": "bold red", "ok": "green"}.get(st, "")
        table.add_row(r["benchmark"], r["case"], _fmt(r["ours"]), _fmt(r["baseline"]), r["unit"],
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                      "-" if r["goal"] is None else f">={r['goal']:.2f}x", f"[{style}]{st}[/]" if style else st,
                      r["note"])
    Console(file=file, width=200).print(table)


def plot_ratios(rows: list[dict], path: Path) -> Path | None:
    """Horizontal bars of each row's ratio, with its goal as a marker; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 1) + 1.4))
    labels = [f"{r['benchmark']}: {r['case']}" for r in rows]
    ys = list(range(len(rows)))[::-1]
    colors = ["tab:gray" if r["goal"] is None else ("tab:green" if r["ratio"] >= r["goal"] else "tab:red")
              for r in rows]
    ax.barh(ys, [r["ratio"] for r in rows], color=colors)
    for y, r in zip(ys, rows):
        if r["goal"] is not None:
            ax.plot([r["goal"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("ratio (> 1: ours better); black tick = goal")
    ax.set_title("readme_jax benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[dict], out_dir: Path, *, quick: bool, names: Iterable[str],
                  elapsed_s: float | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"quick": quick, "benchmarks": list(names), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "python": platform.python_version(), "machine": platform.machine(), "elapsed_s": elapsed_s}
    meta["cpu_count"] = os.cpu_count()
    payload = {"meta": meta, "rows": rows}
    (out_dir / "benchmarks.json").write_text(json.dumps(payload, indent=1))
    png = plot_ratios(rows, out_dir / "benchmarks.png")
    return {"json": out_dir / "benchmarks.json", "png": png}


def main(argv: list[str] | None = None, *, registry: dict[str, str] | None = None,
         importer: Callable[[str], object] = importlib.import_module) -> int:
    import argparse
    registry = REGISTRY if registry is None else registry
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="readme_jax benchmarks: one table of speed ratios measured in the same run")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {list(registry)})")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and shorter cases: a smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(registry)}")
    names = args.names or list(registry)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        print(f"[benchmarks] running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        rows += run_benchmark(name, registry[name], args.quick, importer)
        print(f"[benchmarks] {name} done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    paths = write_results(rows, args.out, quick=args.quick, names=names, elapsed_s=elapsed)
    print_table(rows)
    print(f"wrote {paths['json']}" + (f" and {paths['png']}" if paths["png"] else "") + f" ({elapsed:.0f}s)")
    return 0
