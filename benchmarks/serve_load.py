"""Load test of the HTTP server: ``python -m benchmarks serve_load [--quick]`` or
``python -m benchmarks.serve_load [--quick] [--model smollm2] [--requests 200] [--out DIR]``.

The server runs as its own process (``python -m readme_jax.serve`` on 127.0.0.1, 2 threads); this process
is the client. By default the model is a tiny random Llama with SmolLM2's tokenizer (written to a temporary
checkpoint by a child process), ``--model smollm2`` serves the real one.

1. Warm-up and capacity: one untimed request of each size (whatever compiles late is paid here), then a
   burst from the fixed size mix, all at t=0: its completed requests per second is the engine's measured
   capacity. The server's RSS is read after it.
2. Load: ``--requests`` arrivals, Poisson at 0.8x that capacity, sizes cycling through the same mix (prompts
   are token-id lists, so their lengths are exact; ``ignore_eos`` so every output has its max_tokens). 10% are
   malformed (each must get a 400), 5% disconnect mid-stream after their first chunk; of the valid ones 3 in 4
   stream (with the usage chunk), 1 in 4 does not.
3. Checks: every valid request finished with finish_reason "length" and completion_tokens == max_tokens, the
   server is the same process and healthy, its slots and queue drained, RSS at the end within 50 MB of
   after warm-up. Reported: TTFT and normalised latency (end-to-end / generated tokens) p50/p95/p99, output
   tokens/s; ``OUT/serve_load.json`` and ``OUT/serve_load.png`` (latency CDFs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, make_row, run_variant, thread_env

NAME = "serve_load"
#: (prompt tokens, max_tokens) cycled through by every phase.
SIZE_MIX = ((16, 8), (64, 16), (128, 32), (32, 64), (200, 24), (8, 48))
QUICK_MIX = ((16, 4), (48, 8), (8, 12))
LOAD_FACTOR = 0.8
RSS_LIMIT_MB = 50.0
MALFORMED = (b"{not json", {"n": 2}, {"top_p": 5.0}, {"prompt": None}, {"frobnicate": True}, {"max_tokens": -1})
SERVER_ARGS = ("--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--max-model-len", "512",
               "--max-queue", "512")
DEFAULT_OUT = Path("out/benchmarks")


def write_tiny_checkpoint(out: str) -> dict:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer, saved to ``out`` (runs in a child)."""
    from flax import nnx

    from readme_jax import assets
    from readme_jax.convert.checkpoint import save_checkpoint
    from readme_jax.data.tokenizers import tokenizer_from_gguf
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama

    tok = tokenizer_from_gguf(assets.smollm2_gguf())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    save_checkpoint(out, Llama(cfg, rngs=nnx.Rngs(0)), tokenizer=tok)
    return {"vocab_size": tok.vocab_size}


def percentiles(xs) -> dict[str, float | None]:
    xs = np.asarray(xs, float)
    if xs.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 95, 99)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


def _gauge(metrics_text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", metrics_text, re.M)
    return float(m.group(1)) if m else float("nan")


class Client:
    """Sends one kind of request each and records what came back."""

    def __init__(self, http, model: str, vocab: int, seed: int):
        self.http, self.model, self.vocab = http, model, vocab
        self.rng = np.random.default_rng(seed)

    def body(self, prompt_len: int, max_tokens: int, stream: bool) -> dict:
        ids = self.rng.integers(3, self.vocab, size=prompt_len).tolist()   # no special ids
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def valid(self, prompt_len: int, max_tokens: int, stream: bool, disconnect: bool = False) -> dict:
        body = self.body(prompt_len, max_tokens, stream)
        t0 = time.perf_counter()
        rec = {"kind": "disconnect" if disconnect else ("stream" if stream else "plain"), "max_tokens": max_tokens,
               "prompt_len": prompt_len, "ttft": None, "ok": False}
        try:
            if not stream:
                r = await self.http.post("/v1/completions", json=body)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    data = r.json()
                    rec["completion_tokens"] = data["usage"]["completion_tokens"]
                    rec["finish_reason"] = data["choices"][0]["finish_reason"]
            else:
                async with self.http.stream("POST", "/v1/completions", json=body) as r:
                    rec["status"] = r.status_code
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec["error"] = event["error"]["message"]
                        if event.get("choices"):
                            rec["ttft"] = rec["ttft"] or time.perf_counter() - t0
                            rec["finish_reason"] = event["choices"][0]["finish_reason"] or rec.get("finish_reason")
                            if disconnect:
                                break                                   # leave mid-stream
                        if event.get("usage"):
                            rec["completion_tokens"] = event["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001 - recorded as a failed request
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["latency"] = time.perf_counter() - t0
        rec["ok"] = disconnect or (rec.get("status") == 200 and rec.get("finish_reason") == "length"
                                   and rec.get("completion_tokens") == max_tokens)
        return rec

    async def malformed(self, which: int) -> dict:
        bad = MALFORMED[which % len(MALFORMED)]
        if isinstance(bad, bytes):
            r = await self.http.post("/v1/completions", content=bad, headers={"content-type": "application/json"})
        else:
            r = await self.http.post("/v1/completions", json={**self.body(8, 4, False), **bad})
        shape = r.headers.get("content-type", "").startswith("application/json") and "error" in r.json()
        return {"kind": "malformed", "status": r.status_code, "ok": r.status_code == 400 and shape}


async def _run_phase(client: Client, plan: list[tuple[float, str, int, int]]) -> tuple[list[dict], float]:
    """plan: (arrival offset s, kind, prompt_len, max_tokens); returns the records and the phase's wall time."""
    t0 = time.perf_counter()

    async def launch(offset, kind, prompt_len, max_tokens, i):
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        if kind == "malformed":
            return await client.malformed(i)
        return await client.valid(prompt_len, max_tokens, stream=kind != "plain", disconnect=kind == "disconnect")

    recs = await asyncio.gather(*(launch(*p, i) for i, p in enumerate(plan)))
    return list(recs), time.perf_counter() - t0


def load_plan(n: int, rate: float, mix, seed: int) -> list[tuple[float, str, int, int]]:
    """n Poisson arrivals at ``rate`` per second; every 10th malformed, every 20th disconnecting, 1 in 4 of
    the rest non-streamed; sizes cycle through ``mix``."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=n))
    plan = []
    for i, t in enumerate(offsets):
        kind = "malformed" if i % 10 == 9 else "disconnect" if i % 20 == 4 else "plain" if i % 4 == 1 else "stream"
        prompt_len, max_tokens = mix[i % len(mix)]
        plan.append((float(t), kind, prompt_len, max_tokens))
    return plan


async def _drive(base: str, model: str, vocab: int, n: int, mix, pid: int, seed: int = 0) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0), limits=limits) as http:
        client = Client(http, model, vocab, seed)
        first, _ = await _run_phase(client, [(0.0, "stream", p, m) for p, m in mix])   # any late compile
        warm = [(0.0, "stream", p, m) for p, m in mix] * max(2, 16 // len(mix))
        warm_recs, warm_s = await _run_phase(client, warm)
        warm_recs += first
        tokens = sum(r.get("completion_tokens", 0) for r in warm_recs)
        capacity = len(warm) / warm_s
        rss_warm = _rss_mb(pid)
        plan = load_plan(n, LOAD_FACTOR * capacity, mix, seed)
        recs, load_s = await _run_phase(client, plan)
        await asyncio.sleep(0.5)                               # let cancelled slots free at the next step
        health = (await http.get("/health")).status_code
        metrics = (await http.get("/metrics")).text
    valid = [r for r in recs if r["kind"] in ("stream", "plain")]
    ttft = [r["ttft"] for r in valid if r["ttft"] is not None]
    norm = [r["latency"] / r["max_tokens"] for r in valid if r["ok"]]
    out_tokens = sum(r.get("completion_tokens", 0) for r in valid if r["ok"])
    return {
        "requests": n, "valid": len(valid), "valid_ok": sum(r["ok"] for r in valid),
        "malformed": sum(r["kind"] == "malformed" for r in recs),
        "malformed_400": sum(r["ok"] for r in recs if r["kind"] == "malformed"),
        "disconnected": sum(r["kind"] == "disconnect" for r in recs),
        "failures": [r for r in recs if not r["ok"]][:10],
        "warmup": {"requests": len(warm), "seconds": warm_s, "tokens": tokens,
                   "all_ok": all(r["ok"] for r in warm_recs)},
        "capacity_rps": capacity, "arrival_rps": LOAD_FACTOR * capacity, "load_seconds": load_s,
        "ttft_s": percentiles(ttft), "normalised_latency_s_per_token": percentiles(norm),
        "output_tokens_per_s": out_tokens / load_s,
        "rss_after_warmup_mb": rss_warm, "rss_end_mb": _rss_mb(pid), "health_end": health,
        "active_slots_end": _gauge(metrics, "readme_jax_active_slots"),
        "queue_depth_end": _gauge(metrics, "readme_jax_queue_depth"),
        "_ttft": ttft, "_norm": norm,
    }


def _plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "_ttft", "time to first token (ms)"),
                           (axes[1], "_norm", "end-to-end / generated tokens (ms/token)")):
        xs = np.sort(np.asarray(result[key]) * 1000)
        if xs.size:
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"serve_load: {result['requests']} requests, Poisson at {result['arrival_rps']:.2f} req/s "
                 f"(0.8x capacity), model {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measure(model: str = "tiny", requests: int = 200, quick: bool = False, out: Path = DEFAULT_OUT,
            timeout_s: float = 1800.0) -> dict:
    """Start the server, run both phases, stop it with SIGTERM; returns the result dict (also written)."""
    mix = QUICK_MIX if quick else SIZE_MIX
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        if model == "tiny":
            vocab = run_variant("benchmarks.serve_load:write_tiny_checkpoint", {"out": f"{tmp}/tiny"})["vocab_size"]
            path, name = f"{tmp}/tiny", "tiny"
        else:
            vocab, path, name = 49152, model, "smollm2" if model == "smollm2" else Path(model).name
        port = _free_port()
        cmd = [sys.executable, "-m", "readme_jax.serve", "--model", path, "--port", str(port),
               "--served-model-name", name, "--log-level", "warning", *SERVER_ARGS]
        proc = subprocess.Popen(cmd, env=thread_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, proc, timeout_s)
            t0 = time.perf_counter()
            result = asyncio.run(asyncio.wait_for(_drive(base, name, vocab, requests, mix, proc.pid), timeout_s))
            result["wall_s"] = time.perf_counter() - t0
            result["same_process"] = proc.poll() is None
            proc.send_signal(15)
            result["exit_code"] = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result.update(model=model, quick=quick, size_mix=[list(m) for m in mix])
    result["rss_growth_mb"] = result["rss_end_mb"] - result["rss_after_warmup_mb"]
    result["passed"] = bool(result["valid_ok"] == result["valid"] and result["malformed_400"] == result["malformed"]
                            and result["same_process"] and result["health_end"] == 200
                            and result["active_slots_end"] == 0 and result["queue_depth_end"] == 0
                            and abs(result["rss_growth_mb"]) <= RSS_LIMIT_MB and result["exit_code"] == 0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = _plot(result, out / f"{NAME}.png")
    (out / f"{NAME}.json").write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")},
                                                 indent=1))
    result["png"] = str(png) if png else None
    return result


def wait_ready(base: str, proc: subprocess.Popen | None = None, timeout_s: float = 180.0) -> None:
    """Poll ``base``/health until it answers 200 (the tests use this too); fail at once if ``proc`` exited."""
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')[-1500:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {base} was not ready within {timeout_s:.0f} s")


def rows_of(r: dict) -> list[dict]:
    note = (f"{r['valid_ok']}/{r['valid']} valid ok, {r['malformed_400']}/{r['malformed']} malformed 400, "
            f"{r['disconnected']} disconnected; {r['arrival_rps']:.2f} req/s = 0.8x capacity; "
            f"{'PASSED' if r['passed'] else 'FAILED'}")
    rows = [make_row(NAME, f"output tokens/s ({r['model']})", r["output_tokens_per_s"], None, "tok/s",
                     higher_is_better=True, note=note)]
    for key, label in (("ttft_s", "TTFT"), ("normalised_latency_s_per_token", "latency / token")):
        for q in ("p50", "p95", "p99"):
            v = r[key][q]
            rows.append(make_row(NAME, f"{label} {q}", None if v is None else v * 1000, None, "ms",
                                 higher_is_better=False))
    rows.append(make_row(NAME, "RSS growth after warm-up", r["rss_growth_mb"], RSS_LIMIT_MB, "MiB",
                         higher_is_better=False, goal=None,
                         note=f"{r['rss_after_warmup_mb']:.0f} -> {r['rss_end_mb']:.0f} MiB (limit +-{RSS_LIMIT_MB:g})"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """The benchmark runner's entry point."""
    return rows_of(measure(requests=40 if quick else 200, quick=quick))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random, SmolLM2's tokenizer), 'smollm2', or a path")
    ap.add_argument("--requests", type=int, default=None, help="load-phase requests (default 200; 40 with --quick)")
    ap.add_argument("--quick", action="store_true", help="short outputs and 40 requests: a smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    n = args.requests or (40 if args.quick else 200)
    r = measure(model=args.model, requests=n, quick=args.quick, out=args.out)
    print(json.dumps({k: v for k, v in r.items() if not k.startswith("_") and k != "failures"}, indent=1))
    for f in r["failures"]:
        print("failed:", f, file=sys.stderr)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
