"""Server start-up on an empty vs a filled persistent compilation cache: ``python -m readme_jax.serve`` started
twice with the same model and flags, ``$READMEJAX_CACHE`` pointed at a fresh folder, so the first start compiles
every (token, sequence) bucket and writes them (``assets.enable_compilation_cache``) and the second loads them.

    python -m benchmarks serve_startup           # SmolLM2-135M (our HF export, f32), defaults + --max-num-seqs 32
    python -m benchmarks serve_startup --quick   # the tiny random model of serve_vllm --quick (smoke)

Rows: seconds from process start until ``/health`` and ``/v1/models`` answer 200 (``vllm_peer.Server``), the
first start (the baseline) vs the second (ours; ratio = first / second), each start's CPU seconds, the cache's
size, and a completion's text equal on both starts (greedy, the same prompt: a loaded program computes what the
compiled one did). The HF export is shared with serve_vllm (``runs/bench/serve_vllm``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import make_row, run_variant, thread_env
from benchmarks.serve_vllm import DEFAULT_MODELS, start_ours

NAME = "serve_startup"
PROMPT = "The capital of France is"


def _start(hf_dir: Path, cache: Path, log: Path, timeout_s: float) -> dict:
    """One server start on the cache folder ``cache``: ready seconds, CPU seconds, one greedy completion."""
    import httpx
    server = start_ours(hf_dir, "m", "float32", 32, log, env={**thread_env(), "READMEJAX_CACHE": str(cache),
                                                                    "READMEJAX_JIT_CACHE": "1"})
    try:
        ready = server.wait_ready(timeout_s)
        cpu = server.cpu_seconds()
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        text = httpx.post(server.base + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    finally:
        server.stop()
    return {"ready_s": ready, "cpu_s": cpu, "text": text}


def measure(quick: bool, out: Path | None = None) -> dict:
    model = "tiny" if quick else "smollm2"
    hf_dir = DEFAULT_MODELS / f"{model}-hf"
    run_variant("benchmarks.serve_vllm:export_model", {"model": model, "out": str(hf_dir)})
    out = out or DEFAULT_MODELS.parent / NAME
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="readme-jax-cache-") as tmp:
        cache = Path(tmp)
        starts = [_start(hf_dir, cache, out / f"start_{i}.log", 600 if quick else 1800) for i in (1, 2)]
        files = [p for p in (cache / "jax_compilation_cache").rglob("*") if p.is_file()]
        result = {"model": model, "starts": starts, "cache_files": len(files),
                  "cache_mb": sum(p.stat().st_size for p in files) / 2**20}
    first, second = starts
    note = f"{model}, f32, --max-num-seqs 32; cache {result['cache_files']} files, {result['cache_mb']:.0f} MiB"
    result["rows"] = [
        make_row(NAME, "ready: filled cache vs empty", second["ready_s"], first["ready_s"], "s",
                 higher_is_better=False, note=note),
        make_row(NAME, "start CPU: filled cache vs empty", second["cpu_s"], first["cpu_s"], "CPU s",
                 higher_is_better=False, note="the server process group's user + system seconds until ready"),
        make_row(NAME, "same completion on both starts", float(first["text"] == second["text"]), 1.0, "bool",
                 higher_is_better=True, goal=1.0, note=f"greedy {PROMPT!r} -> {first['text']!r}"),
    ]
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    return result


def run(quick: bool = False) -> list[dict]:
    return measure(quick)["rows"]
