"""Serving benchmark: our continuous-batching engine vs transformers, and Read-ME vs its dense parent.

``python -m benchmarks serve [--quick]`` or ``python -m benchmarks.serve [--quick] [--corpus DIR]
[--trace DIR] [--export DIR] [--out DIR]``. Each system runs in its own long-lived worker subprocess (2
threads: ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2``,
``OMP_NUM_THREADS=2``, ``torch.set_num_threads(2)``; see :mod:`benchmarks.common`) that loads, compiles and
warms up once (timed and reported, never inside a timed run); the parent then asks the workers for one
timed run each in turn, rotating the order every round (interleaved repeats), and takes medians.

**Workload** (the same for every system): the first 64 requests of the Azure LLM inference 2023 conv trace
(``--trace``, default ``../shared/traces/azure_llm_inference_2023`` from the repo root; the public dataset is
github.com/Azure/AzurePublicDataset), lengths scaled by 1/8: prompt = clip(round(ContextTokens / 8), 16,
256) tokens, output = clip(round(GeneratedTokens / 8), 8, 64) tokens, fixed per request (EOS off:
``SamplingParams(ignore_eos=True, max_tokens=n)``). Prompt text: request i takes the next prompt-length
tokens of the held-out split of domain i mod 5 of the default corpus (``--corpus``; default the default
run's ``runs/default/corpus``, else one built under the output folder). All requests are given at t=0.
SmolLM2-135M-Instruct (the pinned GGUF, f32), greedy. Concurrency C = 8 and 32 (``max_num_seqs`` = C,
``max_num_batched_tokens`` = 256 per step, ``max_model_len`` = 320).

**Systems**: ours (``readme_jax.serve.engine.Engine``, decode-first scheduler); transformers' continuous
batching and its static ``generate`` in batches of C (see :mod:`benchmarks.serve_peers` for both configs).

**Metrics**
- output tokens/s = requested output tokens / wall seconds from the first submit to the last token.
  Goal: ours >= 1.3x the better transformers mode at both concurrencies.
- engine efficiency = (R / C) * t_d, where R is our output tokens/s of the run, C the slots and t_d the
  median wall seconds of the run's *full decode steps* (steps that decode all C slots and prefill nothing,
  from ``engine.step_log``): the run's throughput as a fraction of C / t_d, the rate the engine would reach
  if every step were a full decode step. Prefill steps, partly filled steps while the queue fills and
  drains, and host time between steps are what it loses. (When no step decodes all C slots, t_d is taken
  over the fullest decode-only steps and C is their slot count.) Goal >= 0.85.
- token identity vs transformers greedy (f32 both; near-ties can flip an argmax and then the rest):
  the share of requests whose tokens are identical, and over the others the mean index of the first token
  that differs.
- Read-ME vs its dense parent on the same engine at 1, 8 and 32 slots (``--pair-slots``; the first max(16,
  2 x slots) requests, decode-first both): ms per output
  token over the decode-only steps (sum of their wall seconds / tokens they produced); the Read-ME model is
  a default-run export (``--export``, default ``runs/default/export``) whose parent is SmolLM2; without one
  a random tiny Read-ME and a random tiny dense model stand in (labelled; their ratio means nothing).
  Step breakdown (attention, FFN, head, router, other, host) as defined in :mod:`benchmarks.serve_ours`.
  Goals: Read-ME <= 0.8x dense at 1 slot (ratio dense / Read-ME >= 1.25), >= 1.15x at 32 slots (8: reported);
  router < 2% of a step. ``--phases readme`` runs this phase alone.

Output: the runner's table (rows), ``OUT/serve.json`` (settings, setup times, every run's summary) and
``OUT/serve.png`` (tokens/s per system and concurrency; stacked step breakdown), OUT default
``runs/bench/serve`` (git-ignored). ``--quick``: 16 requests, C = 8 only, a 64-token budget (fewer prefill
buckets to compile), 1 round, 8 requests for the Read-ME part: a smoke run of a few minutes.

One worker holds our engines for both parts (an engine of SmolLM2 at 8 slots serves both), another
transformers; the transformers worker exits before the Read-ME part loads its model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import REPO_ROOT, VariantError, thread_env
from benchmarks.serve_report import SYSTEMS, plot, rows_of

FULL = dict(requests=64, concurrencies=(8, 32), budget=256, max_len=320, rounds=2, pair_slots=(1, 8, 32),
            pair_requests=16, breakdown_repeats=5)
QUICK = dict(requests=16, concurrencies=(8,), budget=64, max_len=320, rounds=1, pair_slots=(1, 8),
             pair_requests=8, breakdown_repeats=2)
SCALE, PROMPT_RANGE, OUTPUT_RANGE = 1 / 8, (16, 256), (8, 64)
PHASES = ("serving", "readme")
TRACE_FILE = "AzureLLMInferenceTrace_conv.csv"
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "azure_llm_inference_2023"
DEFAULT_CORPUS = REPO_ROOT / "runs" / "default" / "corpus"
DEFAULT_EXPORT = REPO_ROOT / "runs" / "default" / "export"
DEFAULT_OUT = REPO_ROOT / "runs" / "bench" / "serve"
OURS, PEERS = "benchmarks.serve_ours:EngineWorker", "benchmarks.serve_peers:TransformersWorker"
CALL_TIMEOUT_S = 1800.0


# ------------------------------------------------------------------------------------------ pure helpers
def request_lengths(context_tokens, generated_tokens, n: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of the first ``n`` requests: scaled by SCALE, rounded, clipped to
    PROMPT_RANGE / OUTPUT_RANGE."""
    if len(context_tokens) < n:
        raise ValueError(f"the trace has {len(context_tokens)} requests, the benchmark needs {n}")
    clip = lambda x, lo, hi: int(min(max(round(float(x) * SCALE), lo), hi))  # noqa: E731
    return [(clip(c, *PROMPT_RANGE), clip(g, *OUTPUT_RANGE))
            for c, g in zip(list(context_tokens)[:n], list(generated_tokens)[:n])]


def token_identity(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Share of requests with identical tokens; mean index of the first differing token over the others."""
    if len(ours) != len(theirs):
        raise ValueError(f"token_identity: {len(ours)} vs {len(theirs)} requests")
    first = []
    for a, b in zip(ours, theirs):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        if diff is not None:
            first.append(diff)
    n = len(ours)
    return {"identical": (n - len(first)) / n if n else None, "diverging": len(first),
            "mean_first_divergence": statistics.fmean(first) if first else None}


def decode_only(steps: list[dict]) -> list[dict]:
    return [s for s in steps if s["prefill_tokens"] == 0 and s["decode_tokens"] > 0]


def full_steps(steps: list[dict], slots: int) -> tuple[list[dict], int]:
    """The decode-only steps that decode all ``slots`` slots, else the fullest ones; and their slot count."""
    dec = decode_only(steps)
    if not dec:
        return [], 0
    width = slots if any(s["decode_tokens"] == slots for s in dec) else max(s["decode_tokens"] for s in dec)
    return [s for s in dec if s["decode_tokens"] == width], width


def engine_efficiency(tokens_per_s: float, slots: int, steps: list[dict]) -> dict:
    """(R / C) * t_d (see the module docstring) from one run's step log."""
    full, width = full_steps(steps, slots)
    if not full:
        return {"efficiency": None, "t_decode_s": None, "full_steps": 0, "width": 0}
    t_d = statistics.median(s["seconds"] for s in full)
    return {"efficiency": tokens_per_s / width * t_d, "t_decode_s": t_d, "full_steps": len(full), "width": width}


def ms_per_output_token(steps: list[dict]) -> float | None:
    dec = decode_only(steps)
    tokens = sum(s["decode_tokens"] for s in dec)
    return 1e3 * sum(s["seconds"] for s in dec) / tokens if tokens else None


def rotate(seq, k: int) -> tuple:
    k %= len(seq)
    return tuple(seq[k:]) + tuple(seq[:k])


# ------------------------------------------------------------------------------------------------ workers
class Worker:
    """A long-lived benchmark subprocess: ``TARGET`` = "module:Class"; every call sends one JSON line
    ``{"op", "args"}`` to its stdin and reads one JSON line ``{"ok", "result" | "error"}`` from its stdout."""

    def __init__(self, target: str, timeout: float = CALL_TIMEOUT_S):
        self.target, self.timeout = target, timeout
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve", "--worker", target],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=thread_env(), cwd=REPO_ROOT)

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self._tail()                            # before close() closes the stderr file
            self.close()
            raise VariantError(f"{self.target}: {'timed out' if not ready else 'exited'}; stderr:\n{tail}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise VariantError(f"{self.target}: {reply['error']}")
        return reply["result"]

    def call(self, op: str, **args) -> dict:
        self.send(op, **args)
        return self.recv()

    def _tail(self, lines: int = 15) -> str:
        self._err.seek(0)
        return "\n".join(self._err.read().strip().splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_main(target: str) -> int:
    """The worker side of :class:`Worker` (``python -m benchmarks.serve --worker TARGET``)."""
    from benchmarks.common import apply_thread_settings
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                          # anything printed goes to stderr, not the protocol
    apply_thread_settings()
    module, cls = target.split(":")
    handler = getattr(importlib.import_module(module), cls)()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        try:
            reply = {"ok": True, "result": getattr(handler, msg["op"])(**msg["args"])}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which turns it into an error row
            traceback.print_exc()                          # the worker's stderr (its tail ends a crash report)
            reply = {"ok": False, "error": f"{msg['op']}: {type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ phases
def _log(msg: str) -> None:
    print(f"[serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _summary(res: dict, requests: list) -> dict:
    tokens = sum(n for _, n in requests)
    return {"wall_s": res["wall_s"], "tokens_per_s": tokens / res["wall_s"], "output_tokens": tokens}


def _prepare(ours: Worker, cfg: dict, model: str, slots: int) -> dict:
    p = ours.call("prepare", model=model, slots=slots, budget=cfg["budget"], max_len=cfg["max_len"])
    _log(f"{model} {slots} slots: " + ("engine reused" if p["reused"] else
                                       f"compiled in {p['compile_s']:.0f} s, warmed up in {p['warmup_s']:.1f} s"))
    return p


def serving_phase(cfg: dict, ours: Worker, requests: list, out: dict) -> None:
    """Ours vs transformers at each concurrency (ours' SmolLM2 already loaded); fills ``out``."""
    with Worker(PEERS) as hf:
        out["setup"] = {"transformers": hf.call("setup")}
        _log(f"transformers loaded in {out['setup']['transformers']['load_s']:.0f} s")
        out["prepare"] = {str(c): _prepare(ours, cfg, "smollm2", c) for c in cfg["concurrencies"]}
        runs: dict = {f"{s}@{c}": [] for s in SYSTEMS for c in cfg["concurrencies"]}
        for rnd in range(cfg["rounds"]):
            for c in cfg["concurrencies"]:
                for system in rotate(SYSTEMS, rnd):
                    if system == "ours":
                        res = ours.call("run", model="smollm2", slots=c, requests=requests)
                    elif system == "hf_cb":
                        res = hf.call("run_cb", requests=requests, slots=c, budget=cfg["budget"],
                                      max_len=cfg["max_len"])
                    else:
                        res = hf.call("run_static", requests=requests, slots=c)
                    runs[f"{system}@{c}"].append(res)
                    _log(f"round {rnd + 1}: {system} C={c}: {_summary(res, requests)['tokens_per_s']:.1f} tok/s")
    out["runs"] = {}
    for key, rs in runs.items():
        system, c = key.split("@")
        s = [_summary(r, requests) for r in rs]
        entry = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in s), "repeats": s}
        if system == "ours":
            entry["efficiency"] = [engine_efficiency(x["tokens_per_s"], int(c), r["steps"]) for x, r in zip(s, rs)]
            entry["compiles_during_runs"] = sum(r["compiles_during_run"] for r in rs)
        if system == "hf_cb":
            entry["config"], entry["attn_implementation"] = rs[0]["config"], rs[0]["attn_implementation"]
        out["runs"][key] = entry
    out["identity"] = {str(c): {peer: token_identity(runs[f"ours@{c}"][-1]["tokens"], runs[f"{peer}@{c}"][-1]["tokens"])
                                for peer in ("hf_static", "hf_cb")} for c in cfg["concurrencies"]}


def readme_phase(cfg: dict, ours: Worker, requests: list, export: Path, out: dict) -> None:
    """Read-ME vs its dense parent on the same engine at each of cfg["pair_slots"]: the dense arm in ``ours``,
    the Read-ME arm in a worker of its own (each compiled step program holds ~800 memory mappings on XLA CPU:
    a 32-slot engine of each model in one process passes vm.max_map_count, 65,530 by default, and crashed it),
    one slot count at a time (its two engines prepared, run over the rounds, broken down, then released);
    fills ``out``. If the Read-ME model cannot be served, the dense half is still measured and out["error"]
    says why."""
    pair = ({"dense": "smollm2", "readme": str(export)} if export.is_dir() else
            {"dense": "tiny-dense", "readme": "tiny-readme"})
    out["models"] = pair
    ours.call("release", keep=[])                                        # the serving phase's engines
    with Worker(OURS) as rm:
        out["setup"] = rm.call("load", models={"readme": pair["readme"]})
        if pair["dense"] != "smollm2":
            ours.call("load", models={"tiny-dense": pair["dense"]})
        arms = {"dense": (ours, "smollm2" if pair["dense"] == "smollm2" else "tiny-dense"), "readme": (rm, "readme")}
        out["prepare"], out["runs"] = {}, {}
        for s in cfg["pair_slots"]:
            for m in list(arms):
                try:
                    out["prepare"][f"{m}@{s}"] = _prepare(arms[m][0], cfg, arms[m][1], s)
                except VariantError as e:
                    if m == "dense":
                        raise
                    out["error"] = str(e)
                    del arms[m]
            reqs = requests[: max(cfg["pair_requests"], 2 * s)]          # at least 2 requests per slot
            runs: dict = {m: [] for m in arms}
            for rnd in range(cfg["rounds"]):
                for m in rotate(tuple(arms), rnd):
                    res = arms[m][0].call("run", model=arms[m][1], slots=s, requests=reqs)
                    runs[m].append(res)
                    _log(f"round {rnd + 1}: {m} {s} slots: {ms_per_output_token(res['steps']) or float('nan'):.1f} "
                         f"ms/token")
            context = int(statistics.median(len(p) + n / 2 for p, n in reqs))
            for m, rs in runs.items():
                out["runs"][f"{m}@{s}"] = _pair_run(cfg, arms[m][0], arms[m][1], s, rs, context)
            for w, _ in arms.values():
                w.call("release", keep=[])


def _pair_run(cfg: dict, ours: Worker, model: str, slots: int, rs: list, context: int) -> dict:
    """One (model, slots) arm of the Read-ME phase from its rounds ``rs``: ms per token and the step breakdown."""
    steps = [st for r in rs for st in r["steps"]]
    full, width = full_steps(steps, slots)
    moe = bool(full) and full[0]["distinct_experts"] is not None
    experts = []
    if moe:
        target = statistics.median_low(st["distinct_experts"] for st in full)
        experts = next(st["decode_experts"] for st in full if st["distinct_experts"] == target)
    try:
        bd = ours.call("breakdown", model=model, slots=slots, width=width or None, context=context,
                       experts=experts, repeats=cfg["breakdown_repeats"],
                       step_wall_s=statistics.median(st["seconds"] for st in full) if full else float("nan"))
    except VariantError as e:                       # e.g. parts that do not add up to the step
        bd = {"error": str(e)}
    per_token = [x for x in (ms_per_output_token(r["steps"]) for r in rs) if x is not None]
    return {"ms_per_token": statistics.median(per_token) if per_token else None, "full_step_width": width,
            "breakdown": bd, "requests": len(rs[0]["tokens"]) if rs else 0,
            "distinct_experts_mean": statistics.fmean(st["distinct_experts"] for st in full) if moe else None}


def resolve_trace(trace: Path) -> Path:
    path = trace / TRACE_FILE if trace.is_dir() else trace
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Azure conv trace (expected --trace DIR holding {TRACE_FILE}, from "
                                f"github.com/Azure/AzurePublicDataset)")
    return path


def resolve_corpus(corpus: Path | None, out_dir: Path) -> Path:
    """The given corpus, else the default run's, else the default corpus built once under ``out_dir``."""
    if corpus is not None:
        return corpus
    if (DEFAULT_CORPUS / "manifest.json").is_file():
        return DEFAULT_CORPUS
    built = out_dir / "corpus"
    if not (built / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "readme_jax.data.corpus", "build", str(built)], check=True,
                       env=thread_env(), cwd=REPO_ROOT)
    return built


# -------------------------------------------------------------------------------------------------- rows
def measure(quick: bool = False, *, corpus: Path | None = None, trace: Path = DEFAULT_TRACE,
            export: Path = DEFAULT_EXPORT, out: Path = DEFAULT_OUT, phases: tuple[str, ...] = PHASES,
            pair_slots: tuple[int, ...] | None = None) -> dict:
    """The ``phases`` (default both); writes OUT/serve.json and OUT/serve.png; returns the result (with its
    rows). ``pair_slots``: the Read-ME phase's slot counts (default the config's)."""
    from readme_jax.serve.workload import read_azure_csv
    cfg = dict(QUICK if quick else FULL)
    if pair_slots:
        cfg["pair_slots"] = tuple(pair_slots)
    if set(phases) - set(PHASES) or not phases:
        raise ValueError(f"serve: phases must be some of {list(PHASES)}, got {list(phases)}")
    if max(cfg["pair_slots"]) * 2 > cfg["requests"] and "readme" in phases:
        raise ValueError(f"serve: {max(cfg['pair_slots'])} slots need {2 * max(cfg['pair_slots'])} requests, the "
                         f"workload has {cfg['requests']}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trace_csv = resolve_trace(Path(trace))
    tr = read_azure_csv(trace_csv)
    lengths = request_lengths(tr.prompt, tr.output, cfg["requests"])
    corpus = resolve_corpus(None if corpus is None else Path(corpus), out)
    result: dict = {"quick": quick, "config": cfg, "trace": trace_csv.name, "corpus": str(corpus),
                    "lengths": lengths, "serving": {}, "readme": {}}
    with Worker(OURS) as ours:
        result["setup"] = ours.call("load", models={"smollm2": "smollm2"})
        _log(f"ours: SmolLM2 loaded in {result['setup']['load_s']:.0f} s")
        requests = ours.call("workload", corpus=str(corpus), lengths=lengths)["requests"]
        for phase, fn in (("serving", lambda o: serving_phase(cfg, ours, requests, o)),
                          ("readme", lambda o: readme_phase(cfg, ours, requests, Path(export), o))):
            if phase not in phases:
                continue
            try:
                fn(result[phase])
            except Exception as e:  # noqa: BLE001 - a failed phase becomes an error row; the other still runs
                result[phase] = {"error": f"{type(e).__name__}: {e}"}
    result["elapsed_s"] = time.perf_counter() - t0
    result["rows"] = rows_of(result)
    (out / "serve.json").write_text(json.dumps(result, indent=1, default=str))
    result["png"] = str(plot(result, out / "serve.png"))
    return result


def run(quick: bool = False) -> list[dict]:
    """The benchmark runner's entry point (default paths)."""
    return measure(quick)["rows"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests, C = 8, 1 round: a smoke run")
    ap.add_argument("--corpus", type=Path, default=None, help="a built corpus (default: the default run's, "
                                                               "else built under --out)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help=f"folder holding {TRACE_FILE} (or the CSV)")
    ap.add_argument("--export", type=Path, default=DEFAULT_EXPORT, help="a Read-ME export (default-run layout)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, some of: " + ", ".join(PHASES))
    ap.add_argument("--pair-slots", help="the Read-ME phase's slot counts, comma-separated (default: the "
                                         "config's, 1,8,32; --quick 1,8)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    try:
        phases = tuple(p for p in args.phases.split(",") if p)
        slots = tuple(int(x) for x in args.pair_slots.split(",")) if args.pair_slots else None
        if slots is not None and min(slots) < 1:
            raise ValueError("--pair-slots: expected integers >= 1")
        r = measure(args.quick, corpus=args.corpus, trace=args.trace, export=args.export, out=args.out,
                    phases=phases, pair_slots=slots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from benchmarks.runner import print_table
    print_table(r["rows"], title="serve (ratio > 1: ours / Read-ME better)")
    print(f"wrote {args.out / 'serve.json'} and {r['png']} ({r['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
