"""Shared helpers for the benchmarks: thread settings, the one timing helper (:func:`time_calls`), one fresh
subprocess per variant, bandwidth.

Every benchmark compares two variants (ours vs a baseline) measured in the same run, so every number that
matters is a ratio. Each variant runs in its own fresh Python process (``run_variant``) so that its peak RSS
is its own and so JAX and torch never share a thread pool; the child process gets the thread settings in its
environment before anything imports jax or torch.

A child process is ``python -m benchmarks.common MODULE:FUNC ARGS_JSON OUT_JSON``: it calls
``MODULE.FUNC(**args)`` (which returns a JSON-able dict) and writes that dict plus ``peak_rss_mb`` and
``wall_s`` to OUT_JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_THREADS = 2
XLA_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=true"   # XLA has no thread-count flag; torch/OpenMP below
ROW_KEYS = ("benchmark", "case", "ours", "baseline", "unit", "ratio", "goal", "note")


# ----------------------------------------------------------------------------------------------- threads
def thread_env(base: dict[str, str] | None = None, threads: int = NUM_THREADS) -> dict[str, str]:
    """An environment for a child process: XLA and torch/OpenMP/MKL limited to ``threads`` threads."""
    env = dict(os.environ if base is None else base)
    flags = env.get("XLA_FLAGS", "")
    # A parent under pytest may simulate 8 devices and turn LLVM's optimisation and the fusion emitters off
    # (tests/conftest.py); a benchmark measures one real CPU device compiled as users compile.
    test_only = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level",
                 "--xla_cpu_use_fusion_emitters")
    flags = " ".join(f for f in flags.split() if not f.startswith(test_only))
    env["XLA_FLAGS"] = (flags + " " + XLA_THREAD_FLAGS).strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def apply_thread_settings(threads: int = NUM_THREADS) -> None:
    """Set the thread environment in this process (call before jax/torch are imported) and torch's pool."""
    os.environ.update({k: v for k, v in thread_env(threads=threads).items()
                       if k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "JAX_PLATFORMS", "TOKENIZERS_PARALLELISM")})
    if "torch" in sys.modules:
        set_torch_threads(threads)


def set_torch_threads(threads: int = NUM_THREADS) -> None:
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only allowed once per process)
        pass


# ------------------------------------------------------------------------------------------------ timing
def block(x: Any) -> Any:
    """Wait for every jax array in ``x`` (a no-op for anything else, e.g. torch tensors)."""
    if "jax" in sys.modules:
        import jax
        jax.block_until_ready(x)
    return x


@dataclasses.dataclass(frozen=True)
class Timed:
    """One timed call for :func:`time_calls`: ``fn(*setup())`` timed, ``setup()`` (untimed) run before each
    call (e.g. a prefill whose cache the timed decode consumes); seconds are divided by ``per_call`` (e.g.
    the decode steps of one call)."""
    fn: Callable[..., Any]
    setup: Callable[[], tuple] | None = None
    per_call: int = 1


def time_calls(calls: dict[str, Callable[[], Any] | Timed], *, warmup: int = 1,
               repeats: int = 5) -> dict[str, dict[str, list[float]]]:
    """The one timing helper: time several calls round-robin (a, b, a, b, ...) so background load hits them alike.

    Each value is a no-argument callable or a :class:`Timed`. After ``warmup`` untimed rounds, ``repeats``
    timed rounds; a call returns only once its work is done (jax results are blocked on here).
    Returns ``{name: {"wall": [seconds per unit], "cpu": [process CPU seconds per unit]}}`` (CPU time, all
    threads summed, is the steadier number when other processes share the cores); take :func:`median`.
    """
    timed = {k: v if isinstance(v, Timed) else Timed(v) for k, v in calls.items()}

    def once(t: Timed) -> tuple[float, float]:
        args = block(t.setup()) if t.setup is not None else ()
        c0, t0 = time.process_time(), time.perf_counter()
        block(t.fn(*args))
        return (time.perf_counter() - t0) / t.per_call, (time.process_time() - c0) / t.per_call

    for _ in range(warmup):
        for t in timed.values():
            once(t)
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in timed}
    for _ in range(repeats):
        for name, t in timed.items():
            wall, cpu = once(t)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bandwidth_probe(n_bytes: int = 512 * 1024 * 1024):
    """A jitted f32 reduction over a buffer of ``n_bytes`` (>= 512 MB by default).

    Returns (fn, n_bytes): ``fn()`` streams the whole buffer once; bandwidth = n_bytes / seconds.
    The buffer is allocated once; call ``fn`` interleaved with the timed work so both see the same load."""
    import jax
    import jax.numpy as jnp
    n = n_bytes // 4
    buf = jax.block_until_ready(jnp.arange(n, dtype=jnp.float32) * 1e-9)
    reduce = jax.jit(lambda x: jnp.sum(x))
    return (lambda: reduce(buf)), n * 4


# ------------------------------------------------------------------------------------------ subprocesses
class VariantError(RuntimeError):
    """A variant's child process failed; the message ends with its stderr."""


def run_variant(target: str, args: dict | None = None, *, timeout: float = 1800,
                threads: int = NUM_THREADS) -> dict:
    """Run ``MODULE:FUNC(**args)`` in a fresh Python process with the thread settings; return its dict.

    The dict gains ``peak_rss_mb`` (the child's own peak RSS) and ``wall_s``."""
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.common", target, json.dumps(args or {}), str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=thread_env(threads=threads), cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise VariantError(f"{target} timed out after {timeout:.0f}s") from e
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            raise VariantError(f"{target} exited with {proc.returncode}:\n{tail}")
        result = json.loads(out.read_text())
        result.setdefault("wall_s", time.perf_counter() - t0)
        return result


def echo(**kwargs) -> dict:
    """A trivial variant (for tests of the subprocess plumbing): returns its arguments and the thread env."""
    return {"args": kwargs, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "omp": os.environ.get("OMP_NUM_THREADS"), "jax_imported": "jax" in sys.modules}


def _child_main(argv: list[str]) -> int:
    target, args_json, out_path = argv
    apply_thread_settings()
    import importlib
    mod_name, func_name = target.split(":")
    func = getattr(importlib.import_module(mod_name), func_name)
    t0 = time.perf_counter()
    result = dict(func(**json.loads(args_json)))
    result["wall_s"] = time.perf_counter() - t0
    result.setdefault("peak_rss_mb", peak_rss_mb())  # a variant may report an earlier snapshot
    Path(out_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- rows
def make_row(benchmark: str, case: str, ours: float | None, baseline: float | None, unit: str, *,
             higher_is_better: bool, goal: float | None = None, note: str = "") -> dict:
    """A table row; ``ratio`` > 1 always means ours is better (ours/baseline, or baseline/ours for times)."""
    ratio = None
    if ours is not None and baseline is not None and ours > 0 and baseline > 0:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return {"benchmark": benchmark, "case": case, "ours": ours, "baseline": baseline, "unit": unit,
            "ratio": ratio, "goal": goal, "note": note}


def error_row(benchmark: str, case: str, exc: BaseException | str) -> dict:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {"benchmark": benchmark, "case": case, "ours": None, "baseline": None, "unit": "",
            "ratio": None, "goal": None, "note": "ERROR " + " ".join(str(msg).split())[:400]}


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))


@contextlib.contextmanager
def code_root(rev: str, where: Path):
    """The folder whose ``readme_jax`` is revision ``rev``: this checkout for ``.``, else a detached git worktree
    of it under ``where`` (removed on exit); CalledProcessError if git cannot make it."""
    if rev == ".":
        yield REPO_ROOT
        return
    path = where / rev.replace("/", "_").replace("^", "_parent")
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO_ROOT, check=True,
                   capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO_ROOT, capture_output=True)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
