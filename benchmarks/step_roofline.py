"""The packed model step against the machine's limits: ``python -m benchmarks step_roofline [--quick]``.

SmolLM2-135M shapes (random weights; timing does not depend on them), f32, one ``PagedRunner.step`` (backbone
over paged KV, LM head on the sampling rows, greedy sampling) at three cases: 8 and 32 decode rows at a
128-token context, and one 256-token prefill. Timed parts, each its own jitted call on the step's shapes:
  gemms      the 7 per-layer projections (q, k, v, o, gate, up, down) x 30 layers at M = N rows
  attention  30 x (write K/V + ragged paged attention) over the step's pages (also at twice CHUNK_PAGES: a row
             compares the chunk size the step uses with the next larger one)
  head       final norm + [S, 576] x [576, 49152] head + greedy sampling on the S sampling rows
  other      step - the three (embedding, norms, RoPE, residuals, host packing and dispatch)
Limits measured in the same process: a [1024, 1024] x [1024, 1024] matmul (f32 GFLOP/s peak of XLA here) and
a 512 MB streaming reduction (GB/s). Rows: the step's achieved GFLOP/s vs the matmul peak (useful FLOPs:
2 x params x tokens + attention + head) and its weight GB/s vs the stream. XLA CPU's dot paths are tried as
variants (each in its own process, flag set before jax starts): default, ``--xla_cpu_use_xnnpack=true``,
``--xla_cpu_use_onednn=true``; a row compares each with the default's step time. The same cases at another
revision (``STEP_ROOFLINE_BASE``, default ``BASE``: the step before projection weights were held out-major),
from a git worktree in its own process, give a row per case and part: this code vs that revision.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import code_root, error_row, make_row, median, run_variant, time_calls

CASES = {"decode8": (8, 1, 129), "decode32": (32, 1, 129), "prefill256": (1, 256, 256)}   # (seqs, q_len, kv_len)
FLAG_VARIANTS = {"default": "", "xnnpack": "--xla_cpu_use_xnnpack=true", "onednn": "--xla_cpu_use_onednn=true"}
PAGE = 16
BASE = "91a3134"             # the revision the per-case "vs" rows compare against (STEP_ROOFLINE_BASE overrides)
OVERLAP_TOLERANCE = 0.05     # parts over the step by more than this share: an error row, not a breakdown


def _batch(seqs: int, q_len: int, kv_len: int):
    import numpy as np

    from readme_jax.serve.paged_runner import StepBatch
    pages = -(-(kv_len + 1) // PAGE)
    tables = 1 + np.arange(seqs * pages, dtype=np.int32).reshape(seqs, pages)
    n = seqs * q_len
    rng = np.random.default_rng(0)
    return StepBatch(tokens=rng.integers(0, 49152, n).astype(np.int32),
                     positions=np.tile(np.arange(kv_len - q_len, kv_len), seqs).astype(np.int32),
                     experts=np.full(n, -1, np.int32), q_lens=np.full(seqs, q_len), kv_lens=np.full(seqs, kv_len),
                     page_tables=tables, sample=np.ones(seqs, bool), route_next=np.zeros(seqs, bool),
                     seeds=np.zeros(seqs, np.uint32), temperatures=np.zeros(seqs, np.float32),
                     top_ps=np.ones(seqs, np.float32))


def step_case(flags: str, repeats: int, root: str | None = None) -> dict:
    """One flag variant, all cases, in this (child) process, with ``readme_jax`` from ``root`` (default this
    checkout). Returns times (s) and the static counts."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if root is not None:
        sys.path.insert(0, root)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import bandwidth_probe
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.decoder import project_qkv
    from readme_jax.model.llama import Llama
    from readme_jax.model.packed import head_rows
    from readme_jax.model.paged import CHUNK_PAGES, init_pages, paged_attention, write_kv
    from readme_jax.model.rope import rope_sin_cos
    from readme_jax.sampling import sample_rows
    from readme_jax.serve.paged_runner import PagedRunner
    if root is not None:
        assert Path(sys.modules["readme_jax"].__file__).resolve().is_relative_to(Path(root).resolve()), root

    cfg = LlamaConfig()
    model = Llama(cfg, rngs=nnx.Rngs(0))
    need = sum(s * -(-(kv + 1) // PAGE) for s, _, kv in CASES.values())
    runner = PagedRunner(model, num_pages=need + 2, page_size=PAGE, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=512)
    layers = runner.layers(None)
    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    stream, stream_bytes = bandwidth_probe()

    # weights are arguments, never closed over (a closed-over array becomes an HLO constant)
    @jax.jit
    def gemms(x, layers):
        kvs = []
        for p in layers:
            kvs.append((x @ p["wk"], x @ p["wv"]))
            x = x + (x @ p["wq"]) @ p["wo"]
            x = x + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
        return x, kvs

    @functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("chunk_pages",))
    def attention(x, meta, kv, layers, chunk_pages=CHUNK_PAGES):   # the pool donated, written in place as in the step
        q, k, v = project_qkv(layers[0], x, *rope_sin_cos(jnp.maximum(meta.positions, 0), cfg), cfg)
        kv = [write_kv(kv[i], k, v, meta) for i in range(len(layers))]
        return [paged_attention(q, kv[i], meta, chunk_pages=chunk_pages) for i in range(len(layers))], kv

    pool = {"kv": init_pages(cfg, runner.num_pages, PAGE)}

    def attend(x, meta, chunk_pages=CHUNK_PAGES):
        out, pool["kv"] = attention(x, meta, pool["kv"], layers, chunk_pages=chunk_pages)
        return out

    graphdef, state = nnx.split(model)

    @jax.jit
    def head(x, state):
        logits = head_rows(nnx.merge(graphdef, state), x)
        S = x.shape[0]
        return sample_rows(logits, jnp.zeros(S, jnp.int32), jnp.zeros(S, jnp.int32), jnp.zeros(S), jnp.ones(S))

    calls = {"matmul_1024": lambda: mm(a), "stream": stream}
    for name, (seqs, q_len, kv_len) in CASES.items():
        batch = _batch(seqs, q_len, kv_len)
        N = min(t for t in runner.token_buckets if t >= seqs * q_len)      # the buckets the step pads to
        S = min(t for t in runner.seq_buckets if t >= seqs)
        meta = jax.tree.map(jnp.asarray, runner._meta(batch.q_lens, batch.kv_lens, batch.page_tables, N, S))
        x = jnp.asarray(np.random.default_rng(1).standard_normal((N, cfg.hidden_size)), jnp.float32)
        calls[f"{name} step"] = lambda b=batch: runner.step(b).result()
        calls[f"{name} gemms"] = lambda x=x: gemms(x, layers)
        calls[f"{name} attention"] = lambda x=x, m=meta: attend(x, m)
        calls[f"{name} attention chunk x2"] = lambda x=x, m=meta: attend(x, m, 2 * CHUNK_PAGES)
        calls[f"{name} head"] = lambda x=x[:S]: head(x, state)
    t = time_calls(calls, repeats=repeats)
    params = sum(int(np.prod(v.shape)) for p in layers for v in p.values())
    return {"times": {k: median(v["wall"]) for k, v in t.items()},
            "cpu": {k: median(v["cpu"]) for k, v in t.items()},
            "layer_params": params, "stream_bytes": stream_bytes, "backend": jax.default_backend()}


def _flops(cfg_layer_params: int, name: str) -> tuple[float, float]:
    """(useful FLOPs, weight bytes) of one step of case ``name`` on SmolLM2-135M."""
    seqs, q_len, kv_len = CASES[name]
    n = seqs * q_len
    L, H, hd, D, V = 30, 9, 64, 576, 49152
    ctx = kv_len - (q_len - 1) / 2                                  # mean keys per query (causal)
    attn = 4 * n * ctx * H * hd * L
    head = 2 * seqs * D * V
    return 2 * n * cfg_layer_params + attn + head, 4 * (cfg_layer_params + V * D)


def run(quick: bool = False) -> list[dict]:
    from readme_jax.model.paged import CHUNK_PAGES   # jax starts in the variants' processes, after their flags
    repeats = 3 if quick else 7
    results, rows = {}, []
    for variant, flags in FLAG_VARIANTS.items():
        if quick and variant != "default":
            continue
        try:
            results[variant] = run_variant("benchmarks.step_roofline:step_case", {"flags": flags, "repeats": repeats})
        except Exception as e:  # noqa: BLE001
            rows.append(error_row("step_roofline", f"variant {variant} ({flags})", e))
    ref = os.environ.get("STEP_ROOFLINE_BASE", BASE)
    with tempfile.TemporaryDirectory(prefix="step_roofline_") as tmp:
        try:
            with code_root(ref, Path(tmp)) as root:
                base = run_variant("benchmarks.step_roofline:step_case",
                                   {"flags": "", "repeats": repeats, "root": str(root)})
        except Exception as e:  # noqa: BLE001   (git cannot make the worktree, or the variant fails there)
            base = None
            rows.append(error_row("step_roofline", f"revision {ref}", getattr(e, "stderr", None) or e))
    if "default" not in results:
        return rows
    r = results["default"]
    t = r["times"]
    peak = 2 * 1024 ** 3 / t["matmul_1024"] / 1e9
    bw = r["stream_bytes"] / t["stream"] / 1e9
    for name in CASES:
        flops, wbytes = _flops(r["layer_params"], name)
        step = t[f"{name} step"]
        parts = {p: t[f"{name} {p}"] for p in ("gemms", "attention", "head")}
        other = step - sum(parts.values())
        breakdown = ", ".join(f"{p} {v * 1e3:.1f} ms ({v / step:.0%})" for p, v in parts.items())
        if other < -OVERLAP_TOLERANCE * step:       # the parts are each a subset of the step: not a measurement
            rows.append(error_row("step_roofline", f"{name} step breakdown",
                                  f"the parts add up to {sum(parts.values()) / step:.0%} of the step "
                                  f"({step * 1e3:.1f} ms: {breakdown})"))
        rows.append(make_row("step_roofline", f"{name} step GFLOP/s vs f32 matmul peak", flops / step / 1e9, peak,
                             "GFLOP/s", higher_is_better=True, goal=None,
                             note=f"step {step * 1e3:.1f} ms: {breakdown}, other (embedding, norms, RoPE, "
                                  f"residuals, host packing) {other * 1e3:.1f} ms ({other / step:.0%})"))
        rows.append(make_row("step_roofline", f"{name} attention, {CHUNK_PAGES}-page chunks vs {2 * CHUNK_PAGES}",
                             parts["attention"] * 1e3, t[f"{name} attention chunk x2"] * 1e3, "ms",
                             higher_is_better=False, note=f"30 layers, write K/V + paged attention, page size {PAGE}"))
        rows.append(make_row("step_roofline", f"{name} weight GB/s vs stream", wbytes / step / 1e9, bw, "GB/s",
                             higher_is_better=True, goal=None, note=f"{wbytes / 1e6:.0f} MB of weights per step"))
        if base is not None:
            for part in ("step", "gemms", "attention", "head"):
                rows.append(make_row("step_roofline", f"{name} {part}, this code vs {ref}",
                                     t[f"{name} {part}"] * 1e3, base["times"][f"{name} {part}"] * 1e3, "ms",
                                     higher_is_better=False, note="the same case at that revision, its own process"))
        for variant, rv in results.items():
            if variant != "default":
                rows.append(make_row("step_roofline", f"{name} step, {variant} vs default XLA dots",
                                     rv["times"][f"{name} step"] * 1e3, step * 1e3, "ms", higher_is_better=False,
                                     note=f"{FLAG_VARIANTS[variant]}; matmul_1024 "
                                          f"{rv['times']['matmul_1024'] * 1e3:.1f} ms vs {t['matmul_1024'] * 1e3:.1f}"))
    return rows
