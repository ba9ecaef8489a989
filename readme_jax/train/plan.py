"""Memory and communication plan of the train steps on a mesh, from the compiled steps (no weights, no data).

    python -m readme_jax.train --config configs/llama2_7b_readme.yaml --plan --plan-devices 8

The Read-ME model of the config is built abstractly (``nnx.eval_shape``: shapes only): the dense architecture
from ``model.source``'s config.json when there is one here, else ``model.architecture`` (or ``model.random``
for 'random-tiny'); E = extract.num_experts experts of Fe = round(keep_ratio * F) channels; the config's
router. Params are f32 master weights (the steps' compute runs in ``train.dtype``, with ``train.remat``).
Both steps of a round are lowered and compiled for the mesh with the config's batch as ``train.grad_accum``
micro-batches ([A, b, ...] leaves; b rows split over every device):

* router: ``make_router_step`` on {input_ids <int32>[A, b, T], dist <float32>[A, b, L, T, E]};
* expert: ``ExpertStep.update`` on {input_ids, targets, expert_ids <int32>[A, b, T], loss_mask
  <float32>[A, b, T]} with the all_to_all capacity C = the largest bucket of ``capacity_buckets`` (n, the
  tokens of a device: every token to one device), a bound that holds any routing - a real step picks the
  smallest bucket that holds its routing, so it needs at most this much.

Per step and device it reports, next to each other, the analytic bytes (``bytes_per_device`` of the params,
of the gradients = the trainable params, of the optimizer state under ``opt_state_shardings`` and of the
batch) and the compiled ``memory_analysis()`` (arguments, outputs, the outputs aliased to the donated
inputs, temporaries - gradients and activations -, generated code). Neither step reads its frozen params
(the router step runs only the router; the expert step takes the routing as an input), so jit leaves them
out of the executable's arguments, except the token embedding / LM head that a frozen embedding
(``train.freeze_embedding``) keeps out of the expert step's trainable params while its forward reads them;
the rest stay resident, so the per-device total = arguments + outputs - aliased + temporaries + code + frozen
params not read, checked against an 80 GB device. The analytic trainable params + frozen params read +
optimizer state + batch must equal the compiled argument size within 1% (the check that the step's shardings
are the ones planned); the exit status says whether they do.

Collective bytes per step: the compiled (optimised, partitioned) HLO text is parsed per computation; every
all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute op adds the bytes of its result
(per device) times how often its computation runs. That count is 1 for the entry computation and multiplies
through ``while`` loops by their trip count (the backend_config's ``known_trip_count``, else the constant
bound of the loop condition's compare: the layer scan's L, the micro-batch scan's A); other called
computations (calls, fusions, conditional branches) run as often as their caller. Async pairs count their
``-start`` op once (its last result is the collective's output).

These are CPU figures: an estimate for GPU / TPU, whose compilers fuse, lay out and rematerialise
differently (and have bf16 matmul kernels, where CPU may upcast to f32), and whose local expert kernel is
the ragged one (CPU: blocked).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.atomic import atomic_write_json
from readme_jax.config import Config
from readme_jax.errors import ConfigError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.parallel import expert_parallel as ep
from readme_jax.parallel.mesh import EXPERT_AXIS, batch_size_of, replicated
from readme_jax.parallel.sharding import bytes_per_device
from readme_jax.train import steps as steps_lib
from readme_jax.train.optim import make_optimizer
from readme_jax.train.preflight import _source_config, corpus_domains, train_mesh

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DEVICE_BYTES = 80e9         # the budget a plan is checked against: an 80 GB accelerator
TOLERANCE = 0.01            # analytic vs compiled argument bytes
CAVEAT = ("CPU compile: the memory figures are an estimate for GPU/TPU (other fusion, layouts and "
          "rematerialisation, bf16 matmul kernels, the ragged expert kernel)")


# ------------------------------------------------------------------------------------------ the model
def dense_architecture(cfg: Config) -> tuple[LlamaConfig, str]:
    """(the dense model's LlamaConfig, where it came from) without loading weights."""
    src = cfg.model.source
    hf = _source_config(src) if src not in ("smollm2", "random-tiny") else None
    if hf is not None:
        return LlamaConfig.from_hf(hf, source=f"{src}/config.json"), f"{src}/config.json"
    if cfg.model.architecture is not None:
        return cfg.model.architecture, "model.architecture"
    if src == "random-tiny":
        return cfg.model.random, "model.random"
    raise ConfigError(f"model.architecture: --plan needs the dense model's architecture and model.source={src!r} "
                      "has no config.json here; set model.architecture (LlamaConfig fields: vocab_size, "
                      "hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, ...)")


def readme_config(cfg: Config) -> tuple[ReadMeConfig, str]:
    """The Read-ME config the pipeline would extract (f32 params), and where its architecture came from."""
    base, where = dense_architecture(cfg)
    E = cfg.extract.num_experts or len(corpus_domains(cfg)[0])
    base = base.replace(dtype="float32", param_dtype="float32")
    router = dataclasses.replace(cfg.router, vocab_size=base.vocab_size, num_experts=E)
    fe = int(round(cfg.extract.keep_ratio * base.intermediate_size))
    return ReadMeConfig(base=base, num_experts=E, expert_dim=fe, router=router), where


# ------------------------------------------------------------------------------------------ the steps
def _placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch(kind: str, A: int, b: int, T: int, L: int, E: int) -> dict:
    """The abstract [A, b, ...] batch of a step (see the module docstring)."""
    ids = jax.ShapeDtypeStruct((A, b, T), jnp.int32)
    if kind == "router":
        return {"input_ids": ids, "dist": jax.ShapeDtypeStruct((A, b, L, T, E), jnp.float32)}
    return {"input_ids": ids, "targets": ids, "expert_ids": ids,
            "loss_mask": jax.ShapeDtypeStruct((A, b, T), jnp.float32)}


def plan_step(kind: str, model: nnx.Module, cfg: Config, mesh: jax.sharding.Mesh) -> dict:
    """Lower and compile the ``kind`` step ('router' | 'expert') of ``model`` (abstract) on ``mesh``; its
    figures (bytes per device, collectives, compile seconds)."""
    t, rcfg = cfg.train, model.config
    filt = steps_lib.trainable_filter(kind, freeze_embedding=t.freeze_embedding)
    graphdef = steps_lib.compute_graphdef(model, t.dtype, (filt, ...), remat=t.remat)
    _, trainable, frozen = steps_lib.split_for(model, kind, freeze_embedding=t.freeze_embedding)
    tx = make_optimizer(1.0, t.router_steps if kind == "router" else t.expert_steps,
                        weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    sh = steps_lib.StepShardings.of(trainable, frozen, tx, mesh)
    opt_state = jax.eval_shape(tx.init, trainable)
    A = t.grad_accum
    b = (t.router_batch if kind == "router" else t.expert_batch) // A
    batch = _batch(kind, A, b, t.seq_len, rcfg.base.num_layers, rcfg.num_experts)
    batch_sh = sh.batch(batch)
    static = {}
    if kind == "router":
        fn = steps_lib.make_router_step(graphdef, tx, sh)
    else:
        n_local = b * t.seq_len // batch_size_of(mesh)
        static["capacity"] = ep.capacity_buckets(n_local, mesh.shape[EXPERT_AXIS])[-1]
        fn = steps_lib.ExpertStep(graphdef, tx, sh, num_experts=rcfg.num_experts, dispatcher=t.dispatcher,
                                  loss=steps_lib.ExpertLoss(head_grad=not t.freeze_embedding)).update
    args = (_placed(trainable, sh.trainable), _placed(opt_state, sh.opt_state), _placed(frozen, sh.frozen),
            _placed(batch, batch_sh), jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh)))
    # The plan never runs: on CPU the LLVM backend's optimisation is skipped (the memory plan and the
    # collectives come from the HLO passes before it: the same figures, 2-3x faster compiles).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **static).compile(compiler_options=options)
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()

    trainable_b, frozen_b = bytes_per_device(trainable, sh.trainable), bytes_per_device(frozen, sh.frozen)
    read = steps_lib.BACKBONE_PARAMS if kind == "expert" else nnx.Nothing   # frozen params the step reads
    read_b = bytes_per_device(*(nnx.filter_state(s, read) for s in (frozen, sh.frozen)))
    analytic = {"params": trainable_b + frozen_b, "trainable_params": trainable_b, "frozen_params": frozen_b,
                "frozen_params_read": read_b,
                "gradients": trainable_b, "optimizer_state": bytes_per_device(opt_state, sh.opt_state),
                "batch": bytes_per_device(batch, batch_sh) + 4}               # + the f32 peak lr
    # frozen params: not read by either step (but a frozen embedding), so not arguments (module docstring)
    analytic["arguments"] = trainable_b + read_b + analytic["optimizer_state"] + analytic["batch"]
    comp = {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
            "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
            "generated_code": int(ma.generated_code_size_in_bytes)}
    comp["total"] = (comp["arguments"] + comp["outputs"] - comp["aliased"] + comp["temporaries"]
                     + comp["generated_code"] + frozen_b - read_b)
    comp["activations"] = comp["temporaries"] - analytic["gradients"]   # temporaries less the gradient buffers
    rel = (analytic["arguments"] - comp["arguments"]) / max(comp["arguments"], 1)
    return {"kind": kind, "micro_batches": A, "rows_per_micro_batch": b, "seq_len": t.seq_len,
            "rows_per_device": b // batch_size_of(mesh), **static, "compile_seconds": round(seconds, 1),
            "analytic": analytic, "compiled": comp, "argument_rel_diff": rel, "argument_check": abs(rel) <= TOLERANCE,
            "fits": comp["total"] <= DEVICE_BYTES, "collectives": collective_bytes(compiled.as_text())}


# ------------------------------------------------------------------------------------ collectives
_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")             # a computation's header line
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e\w+)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r"\swhile\(.*condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|branch_computations|called_computations)=(\{[^}]*\}|%[\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")
_BOUND = re.compile(r"constant\((\d+)\)")


def _bytes_of(shape_text: str, last_only: bool) -> int:
    """Bytes of the arrays of an HLO result shape (``bf16[8,128]`` or a tuple of them); the bits are in the
    dtype's name (pred: 8)."""
    sizes = [(8 if d == "pred" else int(re.search(r"\d+", d).group())) * math.prod(int(x) for x in dims.split(",") if x)
             // 8 for d, dims in _SHAPE.findall(shape_text)]
    return (sizes[-1] if last_only else sum(sizes)) if sizes else 0


def collective_bytes(hlo: str) -> dict:
    """Per-device bytes of each collective kind in one run of the compiled module ``hlo`` (its
    ``as_text()``), loops counted by their trip counts (see the module docstring)."""
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            name = m.group(2)
            bodies[name] = []
            entry = name if m.group(1) else entry
        elif name is not None:
            bodies[name].append(line)
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)      # caller -> [(callee, times per call)]
    for caller, lines in bodies.items():
        for line in lines:
            w = _WHILE.search(line)
            if w:
                cond, body = w.groups()
                trip = _TRIP.search(line)
                n = int(trip.group(1)) if trip else _loop_bound(bodies.get(cond, []))
                edges[caller] += [(cond, n + 1), (body, n)]
                continue
            for group in _CALLS.findall(line):
                edges[caller] += [(c, 1) for c in _NAME.findall(group)]
    times: dict[str, int] = defaultdict(int)

    def visit(comp: str, k: int):
        times[comp] += k
        for callee, n in edges.get(comp, []):
            if callee in bodies:
                visit(callee, k * n)
    visit(entry, 1)
    out = {c: 0 for c in COLLECTIVES}
    counts = {c: 0 for c in COLLECTIVES}
    for comp, lines in bodies.items():
        for line in lines:
            m = _OP.search(line)
            if m and times[comp]:
                out[m.group(2)] += times[comp] * _bytes_of(m.group(1), last_only=bool(m.group(3)))
                counts[m.group(2)] += times[comp]
    return {"bytes": out, "ops_run": counts, "total_bytes": sum(out.values())}


def _loop_bound(cond_lines: list[str]) -> int:
    """The trip count of a scan-style loop from its condition (``i < constant(N)``); 1 when not found."""
    bounds = [int(b) for line in cond_lines if "constant(" in line for b in _BOUND.findall(line)]
    return max(bounds) if bounds else 1


# ------------------------------------------------------------------------------------------- report
def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_step(step: dict) -> str:
    """The table of one step's plan (GB = 1e9 bytes, per device)."""
    a, c = step["analytic"], step["compiled"]
    head = (f"{step['kind']} step: A={step['micro_batches']} micro-batches of {step['rows_per_micro_batch']} x "
            f"{step['seq_len']} ({step['rows_per_device']} rows per device)"
            + (f", all_to_all capacity {step['capacity']}" if "capacity" in step else "")
            + f"; compiled in {step['compile_seconds']:.0f} s")
    rows = [("params (trainable + frozen)", a["params"], None),
            ("  trainable", a["trainable_params"], None),
            ("  frozen, read by the step (a frozen embedding)", a["frozen_params_read"], None),
            ("  frozen (resident, not read)", a["frozen_params"] - a["frozen_params_read"], None),
            ("optimizer state", a["optimizer_state"], None), ("batch", a["batch"], None),
            ("arguments (trainable + frozen read + opt + batch)", a["arguments"], c["arguments"]),
            ("outputs", None, c["outputs"]), ("  aliased to donated inputs", None, c["aliased"]),
            ("gradients", a["gradients"], None), ("temporaries (gradients, activations)", None, c["temporaries"]),
            ("  activations etc. (temp - gradients)", None, c["activations"]),
            ("generated code", None, c["generated_code"]),
            ("total (args + out - aliased + temp + code + frozen not read)", None, c["total"])]
    lines = [head, f"  {'per device':52s} {'analytic':>10s} {'compiled':>10s}"]
    for label, x, y in rows:
        lines.append(f"  {label:52s} {_size(x) if x is not None else '':>10s} {_size(y) if y is not None else '':>10s}")
    ok = "ok" if step["argument_check"] else f"FAILED (> {TOLERANCE:.0%})"
    lines.append(f"  analytic vs compiled arguments: {step['argument_rel_diff']:+.4%} {ok}; "
                 f"{'fits' if step['fits'] else 'does NOT fit'} in {DEVICE_BYTES / 1e9:.0f} GB")
    coll = step["collectives"]
    lines.append("  collectives per step and device: " + ", ".join(
        f"{k} {_size(v)} ({coll['ops_run'][k]} ops run)" for k, v in coll["bytes"].items() if v)
        + f"; total {_size(coll['total_bytes'])}")
    return "\n".join(lines)


def run_plan(cfg: Config, run_dir: str | Path | None = None, out: str | Path | None = None) -> int:
    """Plan both steps of ``cfg`` on its mesh, print the tables and write them as JSON to ``out`` (default
    ``<run_dir>/plan/<mesh>.json``). 0 when every step's analytic and compiled argument bytes agree within
    1%, else 1. ConfigError for a mesh that does not fit the devices or the batch."""
    mesh = train_mesh(cfg)
    rcfg, where = readme_config(cfg)
    model = nnx.eval_shape(lambda: ReadMe(rcfg, rngs=nnx.Rngs(0)))
    t = cfg.train
    mesh_name = "-".join(f"{k}{v}" for k, v in mesh.shape.items())
    print(f"plan of {cfg.name}: Read-ME {model.num_params() / 1e9:.3g}B params (E={rcfg.num_experts}, "
          f"Fe={rcfg.expert_dim}; architecture from {where}) on mesh {dict(mesh.shape)} ({mesh.size} "
          f"{jax.devices()[0].platform} devices); f32 params and AdamW, {t.dtype} compute, remat {t.remat}")
    result = {"config": cfg.name, "architecture": where, "mesh": dict(mesh.shape), "devices": mesh.size,
              "platform": jax.devices()[0].platform, "params": model.num_params(),
              "readme": rcfg.to_dict(), "dtype": t.dtype, "remat": t.remat, "grad_accum": t.grad_accum,
              "device_bytes": DEVICE_BYTES, "caveat": CAVEAT, "steps": {}}
    for kind in ("router", "expert"):
        step = plan_step(kind, model, cfg, mesh)
        result["steps"][kind] = step
        print(format_step(step), flush=True)
    path = Path(out) if out else Path(run_dir or Path("runs") / cfg.name) / "plan" / f"{mesh_name}.json"
    atomic_write_json(path, result)
    print(f"{CAVEAT}.\nplan -> {path}")
    return 0 if all(s["argument_check"] for s in result["steps"].values()) else 1
