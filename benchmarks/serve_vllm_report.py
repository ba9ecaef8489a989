"""What ``benchmarks/serve_vllm.py`` measures and how it reports it: the workloads, useful FLOPs per request,
each client run's summary, the runner's rows and the latency-CDF figure (definitions in that module's
docstring)."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import error_row, make_row, pyplot

NAME = "serve_vllm"
GOAL_TPS = {8: 1.2, 32: 0.9}
GOAL_PREFIX = 3.0


# ------------------------------------------------------------------------------------------------ FLOPs
def request_flops(cfg: dict, prompt: int, output: int) -> float:
    """Useful forward FLOPs of one request on an HF Llama ``cfg``: every prompt position and every output token
    but the last runs the layers (QKV/O/FFN GEMMs, plus attention over the filled context: 4 x heads x head_dim
    per key per layer), and each output token costs one LM-head GEMM (the prefill's is the first)."""
    d, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // h
    per_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter)
    tokens = prompt + max(output - 1, 0)
    keys = tokens * (tokens + 1) / 2                       # position t attends t + 1 keys
    return n_layers * (per_layer * tokens + 4 * h * hd * keys) + 2 * d * cfg["vocab_size"] * output


def achieved_gflops(result: dict, cfg: dict) -> float:
    flops = sum(request_flops(cfg, p, o)
                for p, o, e in zip(result["input_lens"], result["output_lens"], result["errors"]) if not e)
    return flops / result["duration"] / 1e9


def summary(res: dict, cfg: dict) -> dict:
    """One client run: its medians, achieved GFLOP/s, the gap between a request's first two chunks (p50; large
    where a server streams a chunk before the first token, which vLLM's client then counts as the TTFT) and
    the noise it saw."""
    gaps = [i[0] for i in res.get("itls", []) if i]
    return {"tok_s": res["output_throughput"], "ttft_ms": res["median_ttft_ms"], "tpot_ms": res["median_tpot_ms"],
            "gflops": achieved_gflops(res, cfg), "duration_s": res["duration"],
            "first_gap_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "realigned": bool(res.get("prompts_realigned")),
            "idle_peer_cpu_s": res["idle_peer_cpu_s"], "loadavg": res["loadavg_1m_before"]}


def workloads(cfg: dict, dtype: str) -> list[dict]:
    out = []
    for kind in ("fixed", "variable"):
        if kind == "variable" and dtype not in cfg["variable_dtypes"]:
            continue
        for c in cfg["concurrencies"]:
            out.append({"key": f"{dtype} {kind} C={c}", "kind": kind, "concurrency": c,
                        "num_prompts": cfg["num_prompts"],
                        "input_len": cfg["input_len"], "output_len": cfg["output_len"],
                        "range_ratio": cfg["range_ratio"] if kind == "variable" else 0.0})
    return out


# -------------------------------------------------------------------------------------------------- rows
def _med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def rows_of(result: dict) -> list[dict]:
    cfg, rows = result["config"], []
    peak = result.get("peak", {})
    best = max((peak[k][lib] for k in ("before", "after") if k in peak for lib in ("numpy", "xla")), default=None)
    quick = "--quick smoke; " if result["quick"] else ""
    rows.append(make_row(NAME, "f32 matmul peak (numpy / XLA, 2 threads)", best, None, "GFLOP/s",
                         higher_is_better=True, note=quick + "; ".join(
                             f"{k}: numpy {v['numpy']:.0f}, XLA {v['xla']:.0f} (n={v['n']})" for k, v in peak.items())))
    s = result.get("setup", {})
    rows.append(make_row(NAME, "setup, excluded from every timing", result.get("elapsed_s"), None, "s total",
                         higher_is_better=False, note=f"vLLM {s.get('vllm_version', 'absent')}; "
                         + "; ".join(f"{d}: ours ready {ph.get('ours_ready_s', 0):.0f} s, vLLM ready "
                                     f"{ph.get('vllm_ready_s', 0):.0f} s, vLLM logs dtype={ph.get('vllm_logged_dtype')}"
                                     for d, ph in result["phases"].items())))
    for dtype, ph in result["phases"].items():
        if "error" in ph:
            rows.append(error_row(NAME, f"{dtype} arms", ph["error"]))
        logged = ph.get("vllm_logged_dtype")
        comparable = logged == dtype
        for w in workloads(cfg, dtype):
            ours = [summary(r, result["hf_config"])
                    for r in ph["runs"].get(f"ours@{w['key']}", [])]
            theirs = [summary(r, result["hf_config"])
                      for r in ph["runs"].get(f"vllm@{w['key']}", [])] if comparable else []
            if not ours:
                continue
            c, f32 = w["concurrency"], dtype == "float32"
            base = (f"{quick}{w['num_prompts']} prompts {w['input_len']}+{w['output_len']} tokens"
                    + (f" (range ratio {w['range_ratio']})" if w["range_ratio"] else "") +
                    f", median of {len(ours)} rounds; idle peer CPU {max(x['idle_peer_cpu_s'] for x in ours):.1f} s"
                    f", load avg {min(x['loadavg'] for x in ours):.1f}-{max(x['loadavg'] for x in ours):.1f}")
            if not comparable:
                base += f"; vLLM not compared: it logs dtype={logged}" if logged else "; no vLLM arm"
            if any(x["realigned"] for x in ours + theirs):
                base += "; the client re-aligned prompts to a server's /tokenize"
            gap = lambda xs: f"{_med(xs, 'first_gap_ms'):.0f} ms" if _med(xs, "first_gap_ms") else "n/a"  # noqa: E731
            notes = {"tok_s": base, "tpot_ms": base,
                     "ttft_ms": base + f"; first-to-second chunk p50: ours {gap(ours)}, vLLM {gap(theirs)}"}
            for key, label, hib, goal in (("tok_s", "output tok/s", True, GOAL_TPS.get(c)),
                                          ("ttft_ms", "TTFT p50", False, 1.0), ("tpot_ms", "TPOT p50", False, 1.0)):
                rows.append(make_row(NAME, f"{w['key']}: {label} vs vLLM", _med(ours, key), _med(theirs, key),
                                     "tok/s" if hib else "ms", higher_is_better=hib, goal=goal if f32 else None,
                                     note=notes[key]))
            g_ours, g_vllm = _med(ours, "gflops"), _med(theirs, "gflops")
            pct = lambda g: f"{100 * g / best:.0f}% of peak" if g and best else "n/a"  # noqa: E731
            rows.append(make_row(NAME, f"{w['key']}: achieved GFLOP/s vs vLLM", g_ours, g_vllm, "GFLOP/s",
                                 higher_is_better=True, note=f"ours {pct(g_ours)}, vLLM {pct(g_vllm)} "
                                                             f"(peak {best or float('nan'):.0f} GFLOP/s, same run)"))
    pr = result.get("prefix")
    if pr is not None:
        on, off = _med(pr["runs"].get("on", []), "median_ttft_ms"), _med(pr["runs"].get("off", []), "median_ttft_ms")
        p = pr["settings"]
        note = (f"{quick}1 request, then {p['num_prompts']} at concurrency {p['concurrency']} sharing a "
                f"{p['prefix_len']}-token prefix (+{p['input_len']} own tokens, {p['output_len']} out)")
        if not pr["flag_accepted"]:
            note += "; n/a: our server does not accept --no-prefix-caching"
        else:
            note += f"; texts identical on vs off: {pr.get('identical_texts')}"
        rows.append(make_row(NAME, "prefix caching: TTFT p50 on vs off (ours)", on, off, "ms",
                             higher_is_better=False, goal=GOAL_PREFIX, note=note))
    elif "prefix_error" in result:
        rows.append(error_row(NAME, "prefix caching", result["prefix_error"]))
    le = result.get("lm_eval")
    if le is not None:
        note = (f"{quick}lm-eval local-completions, {le['items']} items ({le['task']}), float32, the HF tokenizer "
                f"on the client")
        if le.get("same_choice") is not None:
            rows.append(make_row(NAME, "lm-eval MC: items where ours picks vLLM's choice", le["same_choice"],
                                 le["items"], "items", higher_is_better=True,
                                 note=f"{note}; max |d loglik| {le['max_abs_dloglik']:.1e}"))
        rows.append(make_row(NAME, "lm-eval MC: acc vs vLLM", le["acc_ours"], le["acc_vllm"], "acc",
                             higher_is_better=True, note=note))
    elif "lm_eval_error" in result:
        rows.append(error_row(NAME, "lm-eval MC", result["lm_eval_error"]))
    return rows


def plot(result: dict, path: Path) -> Path | None:
    """CDFs of TTFT and of per-request TPOT, float32 fixed-length arms, every round pooled."""
    import numpy as np
    plt = pyplot()
    if plt is None:
        return None
    runs = result["phases"].get("float32", {}).get("runs", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, rs in sorted(runs.items()):
        if " fixed " not in key:
            continue
        ttft = [1e3 * t for r in rs for t in r["ttfts"]]
        tpot = [1e3 * sum(i) / (o - 1)                  # the client's TPOT: (latency - TTFT) / (tokens - 1)
                for r in rs for i, o in zip(r["itls"], r["output_lens"]) if o > 1]
        for ax, xs in ((axes[0], ttft), (axes[1], tpot)):
            xs = np.sort(xs)
            if xs.size:
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=key.replace("@float32 fixed", ""))
    for ax, label in ((axes[0], "time to first token (ms)"), (axes[1], "time per output token (ms)")):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ours vs vLLM {result.get('setup', {}).get('vllm_version', '(absent)')}, {result['config']['model']} "
                 "f32, vLLM's client (openai-chat, random, ignore_eos), 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
