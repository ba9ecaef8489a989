"""Our server at two revisions, end to end: ``python -m benchmarks serve_revs`` or ``python -m benchmarks.serve_revs
[--base REV] [--new REV] [--concurrencies 8,32] [--num-prompts N] [--rounds R] [--out DIR]``.

What a change costs (or buys) the serving benchmark as a user runs it: each side is ``python -m readme_jax.serve``
started from a git worktree of its revision (``--new`` defaults to this checkout, ``.``; ``--base`` to ``main``,
or ``$SERVE_REVS_BASE`` under the runner), serving the same SmolLM2-135M HF export as :mod:`benchmarks.serve_vllm`
(float32, ``--max-num-seqs 32``, every other flag at its default), both live, driven by vLLM's own benchmark
client exactly as there (``openai-chat``, random 128-token prompts, 64 output tokens, ``--ignore-eos``, greedy:
every optional sampling field at its neutral value), one untimed warm-up each, ``--rounds`` rounds (>= 2) with the
two sides alternating and the order rotated every round, the same prompts for both within a round, medians.

Rows, per concurrency: output tokens/s (new / base) and TPOT p50 and TTFT p50 (base / new): a ratio > 1 means
the new revision is faster. Output: ``OUT/serve_revs.json`` (every client result, rewritten after each run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import vllm_peer as vp
from benchmarks.common import REPO_ROOT, code_root, make_row, run_variant, thread_env
from benchmarks.serve_vllm import DEFAULT_MODELS, DEFAULT_VENV, FULL, Driver
from benchmarks.serve_vllm_report import summary
from readme_jax.atomic import atomic_write_text

NAME = "serve_revs"
DEFAULT_OUT = REPO_ROOT / "runs" / "bench" / NAME


def _log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _commit(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


def start(root: Path, label: str, hf_dir: Path, name: str, slots: int, log: Path) -> vp.Server:
    """``python -m readme_jax.serve`` with the ``readme_jax`` of ``root`` (first on its path)."""
    port = vp.free_port()
    env = thread_env()
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "readme_jax.serve", "--model", str(hf_dir), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-num-seqs", str(slots)]
    return vp.Server(label, cmd, env, log, port, cwd=root)


def measure(*, base: str = "main", new: str = ".", concurrencies=(8, 32), num_prompts: int = 64, rounds: int = 2,
            venv: Path = DEFAULT_VENV, out: Path = DEFAULT_OUT, models: Path = DEFAULT_MODELS) -> dict:
    """Both revisions served and driven (see the module docstring); returns the result with its rows."""
    if rounds < 2:
        raise ValueError(f"--rounds {rounds}: at least 2, so that each side runs first once")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sides = {"base": base, "new": new}
    result = {"revs": {k: (v if v == "." else _commit(v)) for k, v in sides.items()}, "runs": {},
              "settings": {"concurrencies": list(concurrencies), "num_prompts": num_prompts, "rounds": rounds,
                           "input_len": FULL["input_len"], "output_len": FULL["output_len"], "slots": FULL["slots"]}}
    save = lambda: atomic_write_text(out / f"{NAME}.json", json.dumps(result, indent=1, default=str))
    vp.ensure_vllm(Path(venv), out / "vllm_install.log")
    hf_dir = (Path(models) / "smollm2-hf").resolve()
    run_variant("benchmarks.serve_vllm:export_model", {"model": "smollm2", "out": str(hf_dir)})
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_") as tmp, contextlib.ExitStack() as stack:
        client = stack.enter_context(vp.VllmClient(Path(venv), out / "vllm_client.log"))
        drive = Driver(client, hf_dir, "smollm2", out, FULL["run_timeout_s"])
        servers = {}
        for side, rev in sides.items():
            root = stack.enter_context(code_root(rev, Path(tmp)))
            servers[side] = stack.enter_context(start(root, f"ours@{result['revs'][side]}", hf_dir, "smollm2",
                                                      FULL["slots"], out / f"{side}.log"))
        for side, s in servers.items():
            result[f"{side}_ready_s"] = s.wait_ready(FULL["start_timeout_s"])
            drive(s, [], seed=10_000, num_prompts=max(concurrencies), concurrency=max(concurrencies),
                  input_len=FULL["input_len"], output_len=16)
            _log(f"{s.label} ready in {result[f'{side}_ready_s']:.0f} s, warmed up")
        for rnd in range(rounds):
            for c in concurrencies:
                for side in (list(servers) if rnd % 2 == 0 else list(servers)[::-1]):
                    idle = [v for k, v in servers.items() if k != side]
                    res = drive(servers[side], idle, seed=rnd, num_prompts=num_prompts, concurrency=c,
                                input_len=FULL["input_len"], output_len=FULL["output_len"])
                    result["runs"].setdefault(f"{side}@C={c}", []).append(summary(res, hf_cfg))
                    save()
                    _log(f"round {rnd + 1} C={c} {servers[side].label}: {res['output_throughput']:.1f} tok/s, "
                         f"TPOT p50 {res['median_tpot_ms']:.1f} ms")
    result["rows"] = rows_of(result)
    save()
    return result


def rows_of(result: dict) -> list[dict]:
    revs, s = result["revs"], result["settings"]
    rows = []
    for c in s["concurrencies"]:
        new, base = (result["runs"].get(f"{side}@C={c}", []) for side in ("new", "base"))
        if not new or not base:
            continue
        med = lambda runs, k: statistics.median(r[k] for r in runs)
        note = (f"{s['num_prompts']} prompts {s['input_len']}+{s['output_len']} tokens, greedy, median of "
                f"{len(new)} rounds; runs: new {[round(r['tok_s'], 1) for r in new]}, base "
                f"{[round(r['tok_s'], 1) for r in base]}")
        case = f"{revs['new']} vs {revs['base']}, C={c}"
        rows.append(make_row(NAME, f"output tok/s, {case}", med(new, "tok_s"), med(base, "tok_s"), "tok/s",
                             higher_is_better=True, note=note))
        for key, what in (("tpot_ms", "TPOT p50"), ("ttft_ms", "TTFT p50")):
            rows.append(make_row(NAME, f"{what}, {case}", med(new, key), med(base, key), "ms",
                                 higher_is_better=False))
    return rows


def run(quick: bool = False) -> list[dict]:
    """The runner's entry: this checkout vs ``$SERVE_REVS_BASE`` (default ``main``); ``quick``: C = 8 only,
    16 prompts."""
    base = os.environ.get("SERVE_REVS_BASE", "main")
    kw = dict(concurrencies=(8,), num_prompts=16) if quick else {}
    return measure(base=base, **kw)["rows"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_revs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="the revision compared against (default main)")
    ap.add_argument("--new", default=".", help="the revision measured (default '.': this checkout as it is)")
    ap.add_argument("--concurrencies", default="8,32", help="comma-separated (default 8,32)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    try:
        cs = tuple(int(c) for c in args.concurrencies.split(","))
        result = measure(base=args.base, new=args.new, concurrencies=cs, num_prompts=args.num_prompts,
                         rounds=args.rounds, out=args.out)
    except (ValueError, subprocess.CalledProcessError, RuntimeError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"error: {detail}", file=sys.stderr)
        return 2
    from benchmarks.runner import print_table
    print_table(result["rows"], title=f"{NAME} (ratio > 1: the new revision is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
