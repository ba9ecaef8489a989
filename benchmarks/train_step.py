"""Expert-step benchmark: the expert step when issue 19 was filed (the code of a base commit, run from a git
worktree of it: fused per-expert weights, LM loss) vs this checkout's default step (tied experts, LM loss, the
configured default), its distillation variant (tied, ``train.expert_loss=kd``) and its frozen-embedding variant
(tied, LM loss, ``train.freeze_embedding=true``: no gradient or optimizer state for the tied embedding / head);
same model shape, same batch.

    python -m benchmarks train_step            # SmolLM2-135M shapes, 4 x 512 tokens, E = 5, f32, 2 threads
    python -m benchmarks train_step --quick    # a tiny model (smoke)
    TRAIN_STEP_BATCH=2 TRAIN_STEP_LAYERS=10 python -m benchmarks train_step   # 2 x 512 tokens, 10 of the 30
                                               # layers (the base's 30-layer step needs ~9 GB at 4 x 512)
    TRAIN_STEP_BASE=REV python -m benchmarks train_step                       # another base (default below)

Each side runs in its own process (``benchmarks.common.run_variant``) with ``code_root`` first on sys.path:
the base commit's worktree (``TRAIN_STEP_BASE``, default :data:`BASE`) or this checkout. Weights are random
(speed does not depend on their values) in the SmolLM2-135M architecture, the same seeded values on every
side; masks from seeded random scores at keep 0.5; the expert ids are the (identically initialised) router's,
so every side routes the same batch the same way. Rows: tokens/s and tokens per CPU-second (ratio = ours /
base, goal 3), model TFLOP/s (PaLM's count, train/throughput.py) and MFU against an f32 [2048 x 2048] x
[2048 x 2048] matmul peak measured in the same process, peak RSS, and where each side's step time goes: one
traced update broken down by XLA op (benchmarks/xla_profile.py; its top ops are in the JSON).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, code_root, error_row, make_row, median, run_variant
from benchmarks.xla_profile import top_ops

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
#: the expert step as issue 19 found it: main before the branch that added tied experts and distillation
BASE = "6c533fa^1"
#: variant -> (tied experts, expert loss, frozen embedding); "base" runs the base commit's code
VARIANTS = {"base": (False, "lm", False), "default": (True, "lm", False), "kd": (True, "kd", False),
            "frozen": (True, "lm", True)}


def _matmul_peak(jax, jnp, n: int) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(3))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(code_root: str, quick: bool, steps: int, variant: str) -> dict:
    """One side: ``steps`` timed expert updates after two untimed ones, with the code under ``code_root``, then
    one traced update broken down by op."""
    sys.path.insert(0, code_root)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.extract.masks import build_masks
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from readme_jax.model.router import RouterConfig
    from readme_jax.parallel.mesh import make_mesh, shard_batch
    from readme_jax.train import steps as steps_lib
    from readme_jax.train.optim import make_optimizer

    import readme_jax
    assert str(Path(readme_jax.__file__).resolve()).startswith(str(Path(code_root).resolve())), readme_jax.__file__
    cfg = LlamaConfig(**(TINY if quick else {**SMOLLM2, "num_layers": int(os.environ.get("TRAIN_STEP_LAYERS", "30"))}))
    E, b, T = 5, (2 if quick else int(os.environ.get("TRAIN_STEP_BATCH", "4"))), (64 if quick else 512)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones(x.shape, x.dtype) if str(p[-1]).find("norm") >= 0 else
        jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32)), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    dense = nnx.merge(graphdef, state)
    masks = build_masks(rng.random((E, cfg.num_layers, cfg.intermediate_size)), 0.5)
    rcfg = RouterConfig(vocab_size=cfg.vocab_size, num_experts=E, **({"dim": 32, "n_heads": 2, "mlp_dim": 32,
                                                                        "embed_rank": 8} if quick else {}))
    tied, loss, freeze = VARIANTS[variant]
    new = loss == "kd"
    kw = {"tied": True} if tied else {}
    model = readme_from_dense(dense, masks, rcfg, rngs=nnx.Rngs(0), **kw)
    gd, trainable, frozen = steps_lib.split_for(model, "expert", **({"freeze_embedding": True} if freeze else {}))
    mesh = make_mesh()
    tx = make_optimizer(1.0, 100, weight_decay=0.01, grad_clip=1.0)
    if new:
        frozen = steps_lib.ExpertStep.frozen_with_teacher(frozen, dense)
    sh = steps_lib.StepShardings.of(trainable, frozen, tx, mesh)
    extra = {} if variant == "base" else {"loss": steps_lib.ExpertLoss(loss, head_grad=not freeze)}
    if new:
        extra["teacher"] = nnx.split(dense)
    step = steps_lib.ExpertStep(gd, tx, sh, num_experts=E, **extra)
    opt = sh.init_opt_state(tx, trainable)
    ids = rng.integers(0, cfg.vocab_size, (1, b, T + 1)).astype(np.int32)
    batch = shard_batch({"input_ids": ids[..., :-1], "targets": ids[..., 1:],
                         "loss_mask": np.ones((1, b, T), np.float32)}, mesh, axis=1)
    lr = jnp.asarray(1e-5, jnp.float32)
    times, cpu = [], []
    warmup = 2          # the second call can compile again (its inputs are the first call's donated outputs)
    for i in range(steps + warmup):
        t0, c0 = time.perf_counter(), time.process_time()
        trainable, opt, metrics = step(trainable, opt, frozen, batch, lr)
        jax.block_until_ready((trainable, metrics["loss"]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # model FLOPs per token (PaLM's 6 N + 12 L H Q T, train/throughput.py), from this checkout's model only:
    # the base's code may predate active_params or throughput.py, and both sides have the same architecture
    fpt = None
    if variant != "base":
        from readme_jax.train.throughput import flops_per_token
        fpt = flops_per_token(model.active_params(), layers=cfg.num_layers, heads=cfg.num_heads,
                              head_dim=cfg.head_dim, seq_len=T)
    fn = next(iter(step.update._fns.values()))
    ex = {"expert_ids": jnp.zeros((1, b, T), jnp.int32)}
    if new:
        ex["teacher_x"] = jnp.zeros((1, b, T, cfg.hidden_size), jnp.float32)
    compiled = fn.lower(trainable, opt, frozen, {**batch, **ex}, lr).compile()
    state = {"tr": trainable, "opt": opt}

    def traced():
        state["tr"], state["opt"], m = step(state["tr"], state["opt"], frozen, batch, lr)
        jax.block_until_ready((state["tr"], m["loss"]))
    profile = top_ops(traced, compiled.as_text())
    peak = _matmul_peak(jax, jnp, 512 if quick else 2048)
    sec = median(times)
    return {"step_s": sec, "step_cpu_s": median(cpu), "tokens": b * T, "model_flops_per_token": fpt,
            "peak_flops": peak,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(state["tr"]))), "profile": profile}


def _profile_note(r: dict) -> str:
    p = r.get("profile") or {}
    if "top" not in p:
        return p.get("error", "no profile")
    kinds = ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in list(p["by_kind_ms"].items())[:5])
    return f"traced step {p['total_ms'] / 1e3:.2f} s by op kind: {kinds}"


def run(quick: bool) -> list[dict]:
    ref = os.environ.get("TRAIN_STEP_BASE", BASE)
    steps = 1 if quick else 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        try:
            with code_root(ref, Path(tmp)) as base_root:
                base = run_variant("benchmarks.train_step:measure",
                                   {"code_root": str(base_root), "quick": quick, "steps": steps, "variant": "base"})
        except subprocess.CalledProcessError as e:
            return [error_row("train_step", f"worktree of {ref}", e.stderr.strip() or str(e))]
        ours = {v: run_variant("benchmarks.train_step:measure",
                               {"code_root": str(REPO_ROOT), "quick": quick, "steps": steps, "variant": v})
                for v in ("default", "kd", "frozen")}
    tps = lambda r: r["tokens"] / r["step_s"]
    case = "tiny" if quick else (f"smollm2_135m L={os.environ.get('TRAIN_STEP_LAYERS', '30')} "
                                 f"{os.environ.get('TRAIN_STEP_BATCH', '4')}x512 E=5")
    names = {"default": "tied+lm (the default)", "kd": "tied+kd", "frozen": "tied+lm, frozen embedding"}
    for v, r in ours.items():
        rows.append(make_row("train_step", f"tokens/s, {names[v]} vs {ref} ({case})", tps(r), tps(base), "tok/s",
                             higher_is_better=True, goal=3.0,
                             note=f"step {r['step_s']:.2f} s vs {base['step_s']:.2f} s"))
        rows.append(make_row("train_step", f"tokens per CPU-second, {names[v]} vs {ref} ({case})",
                             r["tokens"] / r["step_cpu_s"], base["tokens"] / base["step_cpu_s"], "tok/cpu-s",
                             higher_is_better=True, goal=3.0,
                             note="process CPU time (all threads): steadier than wall time on a shared machine"))
    fpt = ours["default"]["model_flops_per_token"]
    for name, r in [*((names[v], r) for v, r in ours.items()), (ref, base)]:
        tf = fpt * r["tokens"] / r["step_s"] / 1e12
        rows.append(make_row("train_step", f"model TFLOP/s vs the f32 matmul peak, {name}", tf,
                             r["peak_flops"] / 1e12, "TFLOP/s", higher_is_better=True,
                             note=f"MFU {tf * 1e12 / r['peak_flops']:.2f} (PaLM's {fpt / 1e6:.0f} MFLOP/token of "
                                  f"model work); {_profile_note(r)}"))
    rows.append(make_row("train_step", "peak RSS, tied+lm", ours["default"]["peak_rss_mb"], base["peak_rss_mb"], "MB",
                         higher_is_better=False,
                         note=f"trainable params {ours['default']['trainable_params']:,} vs "
                              f"{base['trainable_params']:,}"))
    for name, r in ((names["default"], ours["default"]), (ref, base)):
        for op in (r.get("profile") or {}).get("top", [])[:5]:
            rows.append(make_row("train_step", f"top op, {name}: {op['op']} ({op['kind']} {op['shape']})",
                                 op["ms"], None, "ms", higher_is_better=False,
                                 note=f"{op['calls']} calls in one traced step"))
    return rows
