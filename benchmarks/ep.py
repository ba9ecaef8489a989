"""Expert-parallel dispatch (readme_jax/parallel/expert_parallel.py): the all_to_all strategy with host-known
capacity (ours) against the all_gather strategy and against a fixed capacity factor, on an "expert" axis of
M = 8 simulated CPU devices (mesh (data, fsdp, expert) = (1, 1, 8); the variant process sets
``--xla_force_host_platform_device_count=8`` before it imports jax), a SmolLM2-sized MoE layer
(D = 576, Fe = 768, E = 8, f32), N = 8 x 512 tokens (``--quick``: 8 x 64, only "balanced" timed), n = N / 8
per device.

Routing cases (expert ids <int32>[N], device d holding tokens d*n .. (d+1)*n - 1):
  balanced     every expert gets N / E tokens, at random positions
  zipf         the MoE benchmark's pre-gated routing: Zipf-ish marginal with runs (locality 0.71)
  hot60        60% of the tokens on expert 0, the rest uniform
  one_expert   every token on expert 0: the worst case for capacity

Rows (ratio > 1: ours better):
  ep_bytes     bytes moved per token per layer forward, counted from the shapes each strategy sends
               (every device, both directions): all_to_all 2 (M-1)/M x M*C*D*4 + the (M-1) C int32 slot ids;
               all_gather (M-1) n D*4 each way + 2 (M-1) n int32 ids; ratio = all_gather / all_to_all. The
               note gives the minimum: each token that changes device moves one D-vector each way + a 4-byte id.
  ep_time      ms per MoE layer forward / forward+backward (plan made outside, once per batch as in training),
               all_to_all vs all_gather, round-robin; ratio = all_gather / all_to_all. Simulated devices share
               the process's 2 threads, so a collective is a memcpy: this measures the padding and copies each
               strategy runs, not a network.
  ep_capacity  host-known C (smallest bucket over the step's largest (source, destination) count) vs a fixed
               C = ceil(1.25 n / M): padding rows (M*C*devices - kept tokens) and tokens kept (dropped ones are
               lost); the drop counts are the plans' ``dropped``, checked against the counts.
Also writes OUT/ep.json (counts, capacities, times) and OUT/ep_bytes_per_token.png (bytes per token per
strategy and routing case; OUT = out/benchmarks, git-ignored).

    python -m benchmarks ep [--quick]
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import error_row, make_row, median, run_variant, time_calls
from benchmarks.moe import D, FE, skewed_expert_ids

NAME = "ep"
M = 8                                  # devices, all on the "expert" axis
E = 8
DTYPE_BYTES = 4                        # f32 activations
ID_BYTES = 4                           # int32 ids
FACTOR = 1.25
ROUTINGS = ("balanced", "zipf", "hot60", "one_expert")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "out" / "benchmarks"


def routing_ids(kind: str, tokens: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """<int32>[N] expert ids of one routing case (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if kind == "balanced":
        return rng.permutation(np.arange(tokens) % num_experts).astype(np.int32)
    if kind == "zipf":
        return skewed_expert_ids(tokens, num_experts, seed=seed)
    if kind == "hot60":
        return np.where(rng.random(tokens) < 0.6, 0, rng.integers(1, num_experts, tokens)).astype(np.int32)
    if kind == "one_expert":
        return np.zeros(tokens, np.int32)
    raise ValueError(f"routing_ids: unknown routing {kind!r}, expected one of {ROUTINGS}")


def bytes_moved(counts: np.ndarray, capacity: int, d_model: int) -> dict[str, float]:
    """Bytes one layer forward sends between devices, summed over devices, per strategy and the minimum.

    counts <int32>[dev, M]: tokens each device sends to each device of its "expert" axis (device d sits at
    position d % M on it, so counts[d, d % M] stay home); capacity C of the all_to_all."""
    dev, m = counts.shape
    n = int(counts[0].sum())
    row = d_model * DTYPE_BYTES
    a2a = dev * (2 * (m - 1) * capacity * row + (m - 1) * capacity * ID_BYTES)
    gather = dev * (2 * (m - 1) * n * row + 2 * (m - 1) * n * ID_BYTES)
    moving = int(counts.sum() - counts[np.arange(dev), np.arange(dev) % m].sum())
    return {"all_to_all": float(a2a), "all_gather": float(gather), "minimum": float(moving * (2 * row + ID_BYTES))}


def _simulate_devices(count: int) -> None:
    """Make XLA show ``count`` CPU devices (must run before jax is imported)."""
    if "jax" in sys.modules:
        raise RuntimeError("ep benchmark: jax was imported before the simulated devices were set")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={count}"] + flags)


def ep_case(tokens: int, routings: list[str], timed: list[str], repeats: int) -> dict:
    """All variants in this (child) process on the (1, 1, M) mesh. Returns, per routing: counts [dev, M],
    the capacities (ours, factor), the plans' dropped counts and, for the ``timed`` routings,
    {name: {"wall": [s], "cpu": [s]}} of the four layer calls."""
    _simulate_devices(M)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from readme_jax.model import moe
    from readme_jax.parallel import expert_parallel as ep
    from readme_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, make_mesh

    mesh = make_mesh({EXPERT_AXIS: M})
    rows = NamedSharding(mesh, P(BATCH_AXES))
    experts = NamedSharding(mesh, P(EXPERT_AXIS))
    rng = np.random.default_rng(0)
    normal = lambda shape, scale, where: jax.device_put(  # noqa: E731
        (rng.standard_normal(shape) * scale).astype(np.float32), where)
    ws = (normal((E, D, FE), 0.04, experts), normal((E, D, FE), 0.04, experts), normal((E, FE, D), 0.03, experts))
    h, cot = normal((tokens, D), 1.0, rows), normal((tokens, D), 1.0, rows)
    n = tokens // M
    buckets = ep.capacity_buckets(n, M)
    counts_of = jax.jit(lambda ids: ep.dispatch_counts(ids, E, mesh))
    plan_of = jax.jit(lambda ids, d: moe.plan_dispatch(ids, E, dispatcher=d), static_argnums=1)
    fwd = jax.jit(lambda plan, h, ws: moe.moe_ffn(plan, h, *ws))
    fwd_bwd = jax.jit(lambda plan, h, ws, cot: jax.value_and_grad(
        lambda h, ws: jnp.sum(moe.moe_ffn(plan, h, *ws) * cot), argnums=(0, 1))(h, ws))
    gather = ep.ExpertParallel(mesh=mesh, strategy="all_gather")
    out = {"buckets": list(buckets), "routings": {}}
    for kind in routings:
        ids = jax.device_put(routing_ids(kind, tokens, E).reshape(M, n), rows)
        counts = np.asarray(counts_of(ids))
        C = ep.pick_capacity(int(counts.max()), buckets)
        C_f = math.ceil(FACTOR * n / M)
        plans = {"all_to_all": plan_of(ids, ep.ExpertParallel(mesh=mesh, capacity=C)),
                 "all_gather": plan_of(ids, gather)}
        factor_plan = plan_of(ids, ep.ExpertParallel(mesh=mesh, capacity=C_f))
        res = {"counts": counts.tolist(), "capacity": C, "capacity_factor": C_f,
               "dropped": int(plans["all_to_all"].dropped), "dropped_factor": int(factor_plan.dropped)}
        if kind in timed:
            calls = {f"{s} {name}": (lambda f=f, p=p, a=a: f(p, h, ws, *a))
                     for name, f, a in (("fwd", fwd, ()), ("fwd_bwd", fwd_bwd, (cot,))) for s, p in plans.items()}
            res["times"] = time_calls(calls, repeats=repeats)
        out["routings"][kind] = res
    return out


def plot_bytes(per_token: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Grouped bars: bytes per token per routing case (x) and strategy (bars); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = list(per_token)
    strategies = ("all_gather", "all_to_all", "minimum")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(strategies)
    for i, s in enumerate(strategies):
        xs = [k + (i - 1) * width for k in range(len(kinds))]
        ax.bar(xs, [per_token[k][s] / 1024 for k in kinds], width, label=s)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds)
    ax.set_ylabel("KiB moved per token per layer forward")
    ax.set_title(f"expert-parallel dispatch, M={M} devices, D={D} f32")
    ax.set_ylim(0, 1.3 * max(v for r in per_token.values() for v in r.values()) / 1024)
    ax.legend(loc="upper center", ncol=len(strategies))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_of(res: dict, tokens: int) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """The table rows of one ``ep_case`` result, and bytes per token {routing: {strategy: bytes}}."""
    rows, per_token = [], {}
    shape = f"N={tokens} M={M} D={D} E={E}"
    for kind, r in res["routings"].items():
        counts = np.asarray(r["counts"])
        moved = {k: v / tokens for k, v in bytes_moved(counts, r["capacity"], D).items()}
        per_token[kind] = moved
        case = f"{kind} {shape}"
        rows.append(make_row(NAME, f"bytes {case}", moved["all_to_all"], moved["all_gather"], "B/token",
                             higher_is_better=False, goal=1.0,
                             note=f"all_to_all vs all_gather; minimum {moved['minimum']:,.0f} B/token "
                                  f"(all_to_all = {moved['all_to_all'] / moved['minimum']:.2f}x it); "
                                  f"C={r['capacity']} of buckets {res['buckets']}, largest count {counts.max()}"))
        for name in ("fwd", "fwd_bwd") if "times" in r else ():
            t = r["times"]
            wall = {s: median(t[f"{s} {name}"]["wall"]) * 1e3 for s in ("all_to_all", "all_gather")}
            cpu = {s: median(t[f"{s} {name}"]["cpu"]) for s in ("all_to_all", "all_gather")}
            rows.append(make_row(NAME, f"time {name} {case} Fe={FE}", wall["all_to_all"], wall["all_gather"], "ms",
                                 higher_is_better=False,
                                 note=f"all_to_all C={r['capacity']} vs all_gather; CPU-time ratio "
                                      f"{cpu['all_gather'] / cpu['all_to_all']:.2f}; simulated devices, 2 threads"))
        devices = counts.shape[0]
        kept = tokens - r["dropped_factor"]
        pad, pad_f = M * r["capacity"] * devices - tokens, M * r["capacity_factor"] * devices - kept
        drops = (f"dropped: ours {r['dropped']}, factor {FACTOR} {r['dropped_factor']} "
                 f"({100 * r['dropped_factor'] / tokens:.1f}%)")
        rows.append(make_row(NAME, f"padding {case}", pad, pad_f, "rows", higher_is_better=False,
                             note=f"host-known C={r['capacity']} vs factor {FACTOR} C={r['capacity_factor']}; {drops}"))
        rows.append(make_row(NAME, f"kept {case}", tokens - r["dropped"], kept, "tokens", higher_is_better=True,
                             goal=1.0, note=f"tokens through their expert; {drops}"))
    return rows, per_token


def run(quick: bool = False, *, out: str | Path = DEFAULT_OUT) -> list[dict]:
    tokens = M * (64 if quick else 512)
    timed = ["balanced"] if quick else list(ROUTINGS)
    try:
        res = run_variant("benchmarks.ep:ep_case", {"tokens": tokens, "routings": list(ROUTINGS), "timed": timed,
                                                    "repeats": 2 if quick else 5})
    except Exception as e:  # noqa: BLE001
        return [error_row(NAME, f"N={tokens} M={M}", e)]
    rows, per_token = rows_of(res, tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_bytes(per_token, out / "ep_bytes_per_token.png")
    (out / "ep.json").write_text(json.dumps({"result": res, "bytes_per_token": per_token, "rows": rows,
                                             "png": None if png is None else str(png)}, indent=1))
    return rows
