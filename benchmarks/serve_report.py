"""The rows and the plot of ``benchmarks/serve.py`` from its result dict (see that module for the workload,
the systems and the metrics' definitions)."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import error_row, make_row, pyplot

NAME = "serve"
SYSTEMS = ("ours", "hf_cb", "hf_static")
GOAL_TPS, GOAL_EFFICIENCY, GOAL_ROUTER_SHARE = 1.3, 0.85, 0.02
GOAL_READ_ME = {1: 1 / 0.8, 32: 1.15}         # Read-ME vs dense, ms per token ratio, by slots (8: reported)
LABELS = {"ours": "ours (engine)", "hf_cb": "transformers continuous", "hf_static": "transformers static"}
PIECES = ("launch", "embed", "upload", "attention", "ffn", "head", "router", "other", "host")


def rows_of(result: dict) -> list[dict]:
    rows: list[dict] = []
    cfg, s = result["config"], result.get("serving", {})
    quick = " --quick: smoke only;" if result["quick"] else ""
    prep = {**s.get("prepare", {}), **result.get("readme", {}).get("prepare", {})}
    hf = s.get("setup", {}).get("transformers", {})
    rows.append(make_row(NAME, "setup, excluded from every timing", result["elapsed_s"], None, "s total",
                         higher_is_better=False,
                         note=f"ours: load {result['setup']['load_s']:.0f} s; compile + warm-up per engine: " +
                              ", ".join(f"{k} {v['compile_s']:.0f}+{v['warmup_s']:.0f} s" for k, v in prep.items()
                                        if not v["reused"]) +
                              (f"; transformers load {hf['load_s']:.0f} s" if hf else "")))
    if "error" in s:
        rows.append(error_row(NAME, "serving (ours vs transformers)", s["error"]))
    for c in cfg["concurrencies"] if "runs" in s else ():
        ours = s["runs"][f"ours@{c}"]
        budget = f"C={c}, {cfg['budget']} tokens/step, {cfg['requests']} requests"
        for peer in ("hf_cb", "hf_static"):
            theirs = s["runs"][f"{peer}@{c}"]
            note = f"{quick} {budget}; {cfg['rounds']} interleaved rounds"
            if peer == "hf_cb":
                cb = theirs["config"]
                note += (f"; {theirs['attn_implementation']}, max_requests_per_batch={cb['max_requests_per_batch']}, "
                         f"max_batch_tokens={cb['max_batch_tokens']}, page {cb['page_size']} x {cb['num_blocks']} blocks")
            rows.append(make_row(NAME, f"output tok/s C={c} vs {LABELS[peer]}", ours["tokens_per_s"],
                                 theirs["tokens_per_s"], "tok/s", higher_is_better=True, goal=GOAL_TPS,
                                 note=note.strip()))
        eff = [e for e in ours["efficiency"] if e["efficiency"] is not None]
        if eff:
            e = statistics.median(x["efficiency"] for x in eff)
            rows.append(make_row(NAME, f"engine efficiency C={c}", e, 1.0, "fraction", higher_is_better=True,
                                 goal=GOAL_EFFICIENCY,
                                 note=f"(tok/s / {eff[0]['width']} slots) x full decode step "
                                      f"{1e3 * statistics.median(x['t_decode_s'] for x in eff):.1f} ms; "
                                      f"{ours['compiles_during_runs']} compiles in timed runs"))
        for peer in ("hf_static", "hf_cb"):
            ident = s["identity"][str(c)][peer]
            div = ident["mean_first_divergence"]
            rows.append(make_row(NAME, f"greedy tokens identical C={c} vs {LABELS[peer]}", 100 * ident["identical"],
                                 None, "% requests", higher_is_better=True,
                                 note=f"{ident['diverging']} differ" + (f", first at token {div:.1f} on average"
                                                                         if div is not None else "")))
    rm = result.get("readme", {})
    if "error" in rm:
        rows.append(error_row(NAME, "Read-ME vs dense (same engine)", rm["error"]))
    stand_in = "random tiny stand-ins (no export); " if rm.get("models", {}).get("readme") == "tiny-readme" else ""
    for slots in cfg["pair_slots"] if "runs" in rm else ():
        label = f"{slots} slot{'s' * (slots > 1)}"
        d, r = rm["runs"][f"dense@{slots}"], rm["runs"].get(f"readme@{slots}")
        broken = [f"{m}: {x['breakdown']['error']}" for m, x in (("dense", d), ("Read-ME", r))
                  if x is not None and "error" in x["breakdown"]]
        if broken:
            rows.append(error_row(NAME, f"step breakdown, {label}", "; ".join(broken)))
            continue
        db = d["breakdown"]["ms"]
        rows.append(make_row(NAME, f"dense step breakdown, {label}", db["engine_step"], None, "ms/step",
                             higher_is_better=False, note=stand_in + ", ".join(f"{k} {db[k]:.1f}" for k in PIECES)
                             + f" ms; {d['ms_per_token']:.1f} ms/token over decode-only steps"))
        if r is None:
            continue
        bd = r["breakdown"]["ms"]
        note = f"{stand_in}decode-only steps; Read-ME step: " + ", ".join(f"{k} {bd[k]:.1f}" for k in PIECES) + " ms"
        if r["distinct_experts_mean"] is not None:
            note += f"; {r['distinct_experts_mean']:.1f} distinct experts per full step"
        rows.append(make_row(NAME, f"Read-ME vs dense parent, {label}", r["ms_per_token"], d["ms_per_token"],
                             "ms/token", higher_is_better=False, goal=GOAL_READ_ME.get(slots), note=note))
        if bd["engine_step"] > 0:
            share = bd["router"] / bd["engine_step"]
            rows.append(make_row(NAME, f"router share of a Read-ME step, {label}", 100 * share,
                                 100 * GOAL_ROUTER_SHARE, "% of step", higher_is_better=False, goal=1.0,
                                 note=f"router {bd['router']:.2f} of {bd['engine_step']:.1f} ms; ratio = 2% / share"))
    return rows


def plot(result: dict, path: Path) -> Path | None:
    """tokens/s per system and concurrency; stacked step breakdown per model and slots."""
    plt = pyplot()
    if plt is None:
        return None
    s, rm, cfg = result.get("serving", {}), result.get("readme", {}), result["config"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    if "runs" in s:
        cs = cfg["concurrencies"]
        width = 0.8 / len(SYSTEMS)
        for k, system in enumerate(SYSTEMS):
            xs = [i + (k - 1) * width for i in range(len(cs))]
            a.bar(xs, [s["runs"][f"{system}@{c}"]["tokens_per_s"] for c in cs], width, label=LABELS[system])
        a.set_xticks(range(len(cs)))
        a.set_xticklabels([f"C = {c}" for c in cs])
        a.set_ylabel("output tokens / s")
        a.legend(fontsize=8)
    a.set_title(f"{cfg['requests']} Azure-conv requests at t=0, SmolLM2-135M f32, 2 threads")
    if "runs" in rm:
        keys = [f"{m}@{sl}" for sl in cfg["pair_slots"] for m in ("dense", "readme")
                if f"{m}@{sl}" in rm["runs"] and "ms" in rm["runs"][f"{m}@{sl}"]["breakdown"]]
        bottom = [0.0] * len(keys)
        for piece in PIECES:
            vals = [max(rm["runs"][k]["breakdown"]["ms"][piece], 0.0) for k in keys]
            b.bar(range(len(keys)), vals, bottom=bottom, label=piece)
            bottom = [x + y for x, y in zip(bottom, vals)]
        b.set_xticks(range(len(keys)))
        b.set_xticklabels([k.replace("@", "\n") + " slots" for k in keys], fontsize=8)
        b.set_ylabel("ms per decode step")
        b.legend(fontsize=8)
    b.set_title("decode step breakdown (same engine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- entry
