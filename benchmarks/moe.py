"""MoE FFN benchmark: our routed FFN (sort once -> blocked grouped matmul -> unsort) against the ways the
same compute is usually done, at SmolLM2-135M dimensions (D=576, F=1536, keep 0.5 so Fe=768), f32, 2 threads.

Rows (ratio = baseline time / our time, > 1 = ours faster):
  vs_dense          our dense SwiGLU FFN (F=1536): what the MoE replaces; ideal ratio ~2 (half the channels)
  vs_masked_dense   dense FFN times a per-token channel mask: how the authors train the experts
  vs_torch_loop     a torch loop over experts with index_select / index_add_: how the authors' MoE runs
  vs_ragged_dot     lax.ragged_dot (the GPU/TPU path; on CPU XLA lowers it to a masked loop over experts)
  train_step        forward+backward of a few decoder layers (attention + FFN via run_layers), MoE vs masked-dense
  matmul_ceiling    one [N, D] x [D, Fe] matmul, XLA vs torch: the cap on vs_torch_loop, since both sides are
                    the same matmuls plus data movement
  moe_decode        decode steps (B = 1, 8 and 32 tokens, 30 layers, residual FFN only): the decode dispatcher
                    (per-expert lax.cond over static split weights) vs the dense FFN; the grouped dispatcher
                    (sorted rows, per-expert windows) vs the decode and blocked ones

Expert ids are skewed like pre-gated routing: a Zipf-ish expert distribution with runs of the same expert
(each token keeps the previous token's expert with probability 0.71, the locality Read-ME reports).
JAX variants run interleaved in one subprocess, the torch ones in another (benchmarks.common.run_variant), all
timed by benchmarks.common.time_calls (``python -m benchmarks moe``). The
FFN variants, the ragged_dot fallback and the (seconds-long) training steps are timed in separate
round-robins: a timed call right after one of those pays for cold caches and fresh pages, which once
doubled the MoE FFN's time.
"""

from __future__ import annotations

from benchmarks.common import error_row, make_row, median, run_variant, time_calls

D, F, KEEP = 576, 1536, 0.5
FE = int(F * KEEP)
TOKENS = 4096
LOCALITY = 0.71


def skewed_expert_ids(n: int, num_experts: int, seed: int = 0, locality: float = LOCALITY):
    """<int32>[n] expert ids: Zipf-ish marginal (p_e ~ 1/(e+1)^0.8) with runs (keep previous w.p. locality)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** 0.8
    p /= p.sum()
    fresh = rng.choice(num_experts, size=n, p=p)
    keep = rng.random(n) < locality
    keep[0] = False
    src = np.where(keep, 0, np.arange(n))
    src = np.maximum.accumulate(src)             # index of the last fresh draw at or before each token
    return fresh[src].astype(np.int32)


def _weights(num_experts: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    f32 = np.float32
    dense = {"w_gate": rng.standard_normal((D, F), f32) * 0.04, "w_up": rng.standard_normal((D, F), f32) * 0.04,
             "w_down": rng.standard_normal((F, D), f32) * 0.03}
    channels = np.stack([np.sort(rng.permutation(F)[:FE]) for _ in range(num_experts)])   # [E, Fe]
    experts = {"w_gate": dense["w_gate"][:, channels].transpose(1, 0, 2),                  # [E, D, Fe]
               "w_up": dense["w_up"][:, channels].transpose(1, 0, 2),
               "w_down": dense["w_down"][channels]}                                         # [E, Fe, D]
    masks = np.zeros((num_experts, F), f32)
    np.put_along_axis(masks, channels, 1.0, axis=1)
    return dense, experts, masks


def jax_case(num_experts: int, tokens: int, repeats: int, layers: int, ragged: bool, train: bool) -> dict:
    """All JAX variants, timed round-robin in this (child) process. Returns {name: seconds per call}."""
    import jax
    import jax.numpy as jnp

    from readme_jax.model import dispatch, moe
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.decoder import dense_ffn, run_layers

    B = 4
    T = tokens // B
    ids = jnp.asarray(skewed_expert_ids(B * T, num_experts)).reshape(B, T)
    dense, experts, masks = jax.tree.map(jnp.asarray, _weights(num_experts))
    h = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)

    def masked_dense_ffn(p, h, token_masks):
        act = jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"]) * token_masks
        return act @ p["w_down"]

    blocked = dispatch.Blocked()
    plan_fn = jax.jit(lambda i: moe.plan_dispatch(i, num_experts, dispatcher=blocked))
    plan = jax.block_until_ready(plan_fn(ids))
    fwd_moe = jax.jit(lambda plan, h, w: moe.moe_ffn(plan, h, w["w_gate"], w["w_up"], w["w_down"]))
    fwd_moe_plan = jax.jit(lambda ids, h, w: moe.moe_ffn(moe.plan_dispatch(ids, num_experts, dispatcher=blocked),
                                                         h, w["w_gate"], w["w_up"], w["w_down"]))
    fwd_dense = jax.jit(lambda h, w: dense_ffn(w, h)[0])
    fwd_masked = jax.jit(lambda ids, h, w: masked_dense_ffn(w, h, masks[ids]))
    x2d, w_e0 = h.reshape(-1, D), experts["w_up"][0]
    matmul = jax.jit(lambda x, w: x @ w)
    fns = {"moe": lambda: fwd_moe(plan, h, experts),
           "moe_with_plan": lambda: fwd_moe_plan(ids, h, experts),
           "dense": lambda: fwd_dense(h, dense),
           "masked_dense": lambda: fwd_masked(ids, h, dense),
           "matmul": lambda: matmul(x2d, w_e0)}
    times = time_calls(fns, repeats=repeats)
    if ragged:   # its own round-robin too: its [E, N, Fe] temporaries would cost the next timed call
        fwd_ragged = jax.jit(lambda plan, h, w: moe.moe_ffn(plan, h, w["w_gate"], w["w_up"], w["w_down"]))
        plan_r = moe.plan_dispatch(ids, num_experts, dispatcher=dispatch.Ragged())
        times["ragged"] = time_calls({"ragged": lambda: fwd_ragged(plan_r, h, experts)}, repeats=3)["ragged"]
    if train:
        cfg = LlamaConfig(num_layers=layers)           # SmolLM2-135M dims: D 576, 9 heads / 3 kv heads, F 1536
        key = jax.random.key(1)

        def rand(shape, scale=0.04):
            nonlocal key
            key, sub = jax.random.split(key)
            return jax.random.normal(sub, shape, jnp.float32) * scale

        attn = {"attn_norm": jnp.ones((layers, D)), "mlp_norm": jnp.ones((layers, D)),
                "wq": rand((layers, D, 576)), "wk": rand((layers, D, 192)), "wv": rand((layers, D, 192)),
                "wo": rand((layers, 576, D))}
        stack = lambda w: jnp.stack([w] * layers)
        moe_layers = {**attn, **{k: stack(v) for k, v in experts.items()}}
        dense_layers = {**attn, **{k: stack(v) for k, v in dense.items()}}
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        amask = jnp.ones((B, T), bool)

        def loss(layers_, ffn_fn):
            y, _, _ = run_layers(layers_, h, positions=pos, attention_mask_=amask, cfg=cfg, ffn_fn=ffn_fn)
            return jnp.mean(y ** 2)

        @jax.jit
        def step_moe(layers_, ids):
            return jax.value_and_grad(loss)(layers_, moe.moe_ffn_fn(moe.plan_dispatch(ids, num_experts,
                                                                                      dispatcher=blocked)))

        @jax.jit
        def step_masked(layers_, ids):
            tm = masks[ids]
            return jax.value_and_grad(loss)(layers_, lambda p, x: (masked_dense_ffn(p, x, tm), None))

        times.update(time_calls({"train_moe": lambda: step_moe(moe_layers, ids),
                                 "train_masked_dense": lambda: step_masked(dense_layers, ids)},
                                repeats=max(3, repeats // 2)))
    return {"times": times, "group_sizes": [int(x) for x in plan.group_sizes]}


def jax_decode_case(num_experts: int, batches: list, layers: int, steps: int, repeats: int) -> dict:
    """Decode steps of the FFNs alone (x += ffn(x) / 100 through ``layers`` layers, ``steps`` steps in one
    fori_loop): dense, the decode dispatcher (on split and on stacked [E, D, Fe] weights), the blocked
    one and the grouped one. Per-layer weights are split (in the variant's layout) once, outside the timed
    calls, as a decode loop does before its first step; plans are made once per step.
    Returns {"times": {name: seconds per step}, "experts_used": {B: count}}."""
    import jax
    import jax.numpy as jnp

    from readme_jax.model import dispatch, moe
    from readme_jax.model.decoder import dense_ffn

    keys = iter(jax.random.split(jax.random.key(0), 6))
    rand = lambda shape, scale: jax.random.normal(next(keys), shape, jnp.float32) * scale
    dense = {"w_gate": rand((layers, D, F), .04), "w_up": rand((layers, D, F), .04),
             "w_down": rand((layers, F, D), .03)}
    experts = {"w_gate": rand((layers, num_experts, D, FE), .04), "w_up": rand((layers, num_experts, D, FE), .04),
               "w_down": rand((layers, num_experts, FE, D), .03)}
    split = lambda w, prepare: jax.block_until_ready(jax.jit(lambda w: [prepare({k: v[i] for k, v in w.items()})
                                                                        for i in range(layers)])(w))

    def loop(d):
        @jax.jit
        def run(h, ids, per_layer):
            def step(_, h):
                ffn = dense_ffn if d is None else moe.moe_ffn_fn(moe.plan_dispatch(ids, num_experts, dispatcher=d))
                for p in per_layer:
                    h = h + ffn(p, h)[0] / 100
                return h
            return jax.lax.fori_loop(0, steps, step, h)
        return run

    dec, blk, grp = dispatch.Decode(), dispatch.Blocked(), dispatch.Grouped()
    per_expert, stacked = split(experts, dec.prepare_layer), split(experts, lambda p: p)   # grouped: as decode
    runs = {"dense": (loop(None), split(dense, lambda p: p)),
            "decode": (loop(dec), per_expert),
            "decode_stacked": (loop(dec), stacked),
            "blocked": (loop(blk), stacked),
            "grouped": (loop(grp), per_expert)}
    del dense, experts
    times, used = {}, {}
    for B in batches:
        h = jax.random.normal(jax.random.key(1), (B, 1, D), jnp.float32)
        ids = jnp.asarray(skewed_expert_ids(B, num_experts, seed=B)).reshape(B, 1)
        used[B] = int(len(set(ids.reshape(-1).tolist())))
        t = time_calls({f"{k} B={B}": (lambda f=f, w=w: f(h, ids, w)) for k, (f, w) in runs.items()}, repeats=repeats)
        times.update({k: {kk: [x / steps for x in vv] for kk, vv in v.items()} for k, v in t.items()})
    return {"times": times, "experts_used": used}


def torch_case(num_experts: int, tokens: int, repeats: int) -> dict:
    """The authors' way: loop over experts, index_select the expert's tokens, index_add_ the outputs."""
    import numpy as np
    import torch
    import torch.nn.functional as Fn

    torch.set_grad_enabled(False)
    ids = torch.from_numpy(skewed_expert_ids(tokens, num_experts)).long()
    dense, experts, _ = _weights(num_experts)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((tokens, D), np.float32))
    # nn.Linear layout: weight [out, in]
    wg = [torch.from_numpy(np.ascontiguousarray(experts["w_gate"][e].T)) for e in range(num_experts)]
    wu = [torch.from_numpy(np.ascontiguousarray(experts["w_up"][e].T)) for e in range(num_experts)]
    wd = [torch.from_numpy(np.ascontiguousarray(experts["w_down"][e].T)) for e in range(num_experts)]
    dg, du, dd = (torch.from_numpy(np.ascontiguousarray(dense[k].T)) for k in ("w_gate", "w_up", "w_down"))

    def expert_loop(scatter):
        out = torch.zeros_like(x)
        for e in range(num_experts):
            idx = torch.nonzero(ids == e, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            xe = x.index_select(0, idx)
            ye = Fn.linear(Fn.silu(Fn.linear(xe, wg[e])) * Fn.linear(xe, wu[e]), wd[e])
            scatter(out, idx, ye)
        return out

    def dense_ffn():
        return Fn.linear(Fn.silu(Fn.linear(x, dg)) * Fn.linear(x, du), dd)

    w_e0 = torch.from_numpy(np.ascontiguousarray(experts["w_up"][0]))        # [D, Fe], as x @ w in JAX

    # index_add_ is the authors' pattern; with top-1 routing index_copy_ is equivalent and much faster on CPU
    return {"times": time_calls({"torch_loop_add": lambda: expert_loop(lambda o, i, y: o.index_add_(0, i, y)),
                                 "torch_loop_copy": lambda: expert_loop(lambda o, i, y: o.index_copy_(0, i, y)),
                                 "torch_dense": dense_ffn,
                                 "torch_matmul": lambda: x @ w_e0}, repeats=repeats)}


def run(quick: bool = False) -> list[dict]:
    experts_list = (5,) if quick else (4, 5, 8)
    repeats = 5 if quick else 7
    layers = 2
    rows = []
    for E in experts_list:
        case = f"E={E} N={TOKENS} D={D} Fe={FE} f32"
        try:
            j = run_variant("benchmarks.moe:jax_case", {"num_experts": E, "tokens": TOKENS, "repeats": repeats,
                                                        "layers": layers, "ragged": E == 5 and not quick,
                                                        "train": E == 5})
            t = run_variant("benchmarks.moe:torch_case", {"num_experts": E, "tokens": TOKENS, "repeats": repeats})
        except Exception as e:  # noqa: BLE001
            rows.append(error_row("moe_ffn", case, e))
            continue
        jt = {k: median(v["wall"]) * 1e3 for k, v in j["times"].items()}
        tt = {k: median(v["wall"]) * 1e3 for k, v in t["times"].items()}
        jc = {k: median(v["cpu"]) for k, v in j["times"].items()}
        tc = {k: median(v["cpu"]) for k, v in t["times"].items()}
        sizes = "group sizes " + "/".join(map(str, j["group_sizes"]))
        ours = jt["moe"]

        def row(name, base, base_cpu, goal, note):
            return make_row("moe_ffn", f"{case} {name}", ours, base, "ms", higher_is_better=False, goal=goal,
                            note=f"{note}; CPU-time ratio {base_cpu / jc['moe']:.2f}")

        rows.append(row("vs_dense", jt["dense"], jc["dense"], 1.8, f"dense F={F}; {sizes}; plan excluded "
                        f"(with plan {jt['moe_with_plan']:.1f} ms)"))
        rows.append(row("vs_masked_dense", jt["masked_dense"], jc["masked_dense"], None,
                        "dense FFN x per-token channel mask"))
        rows.append(row("vs_torch_loop", tt["torch_loop_copy"], tc["torch_loop_copy"], 1.0,
                        f"torch index_select/index_copy_ loop (index_add_ {tt['torch_loop_add']:.1f} ms); "
                        f"torch dense {tt['torch_dense']:.1f} ms"))
        rows.append(make_row("moe_ffn", f"{case} matmul_ceiling", jt["matmul"], tt["torch_matmul"], "ms",
                             higher_is_better=False,
                             note=f"one [{TOKENS}, {D}] x [{D}, {FE}] matmul, XLA vs torch: bounds vs_torch_loop"))
        if "ragged" in jt:
            rows.append(row("vs_ragged_dot", jt["ragged"], jc["ragged"], None,
                            "lax.ragged_dot (CPU: masked fallback)"))
        if "train_moe" in jt:
            rows.append(make_row("moe_train_step", f"E={E} {layers} layers B=4 T={TOKENS // 4} f32 fwd+bwd",
                                 TOKENS / jt["train_moe"] * 1e3, TOKENS / jt["train_masked_dense"] * 1e3,
                                 "tok/s", higher_is_better=True, goal=1.25,
                                 note="run_layers MoE vs masked-dense (authors' training), value_and_grad; "
                                      f"CPU-time ratio {jc['train_masked_dense'] / jc['train_moe']:.2f}"))
    rows += decode_rows(quick)
    return rows


def decode_rows(quick: bool, num_experts: int = 5, layers: int = 30) -> list[dict]:
    """The moe_decode rows at B = 1, 8 and 32 tokens per step, one subprocess: the decode dispatcher vs the
    dense FFN, and the grouped dispatcher vs the decode and the blocked ones (the measurement behind
    ``dispatch.default_dispatcher``'s CPU choice per row count)."""
    batches = [1, 8, 32]
    case = f"E={num_experts} {layers} layers D={D} Fe={FE} f32"
    try:
        j = run_variant("benchmarks.moe:jax_decode_case", {"num_experts": num_experts, "batches": batches,
                                                            "layers": layers, "steps": 4 if quick else 16,
                                                            "repeats": 3 if quick else 7})
    except Exception as e:  # noqa: BLE001
        return [error_row("moe_decode", case, e)]
    jt = {k: median(v["wall"]) * 1e3 for k, v in j["times"].items()}
    rows = []
    for B in batches:
        used = f"{j['experts_used'][str(B)]} of {num_experts} experts used"
        rows.append(make_row("moe_decode", f"{case} B={B} decode dispatcher vs dense FFN", jt[f"decode B={B}"],
                             jt[f"dense B={B}"], "ms/step", higher_is_better=False, goal=None,
                             note=f"decode on stacked (unsplit) weights {jt[f'decode_stacked B={B}']:.1f} "
                                  f"ms/step; {used}"))
        for other in ("decode", "blocked"):
            rows.append(make_row("moe_decode", f"{case} B={B} grouped vs {other} dispatcher", jt[f"grouped B={B}"],
                                 jt[f"{other} B={B}"], "ms/step", higher_is_better=False, goal=None,
                                 note=f"dense FFN {jt[f'dense B={B}']:.1f} ms/step; {used}"))
    return rows
