"""The layer-wise-router MoE that Read-ME argues is redundant (MoEfication / Mixtral style), and its redundancy.

Same experts as Read-ME, but layer l routes its own tokens: a linear top-1 router ``W_l [D, E]`` reads that
layer's FFN input (the normed hidden state the experts read), ``expert_l = argmax(h_l W_l)``. The L routers are
trained on the same per-layer distillation targets as Read-ME's router (the router pool's ``dist [N, L, T, E]``
and loss, ``losses.distill_loss`` per layer), on the dense parent's FFN inputs of the pool computed once (the
targets are the parent's too); evaluation runs the MoE on its own hidden states. The redundancy analysis
(paper section 2.2) counts the layer-wise routes of held-out tokens (:mod:`readme_jax.science.redundancy`).

    python -m readme_jax.science layerwise --run-dir runs/default
"""

from __future__ import annotations

import dataclasses

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.atomic import atomic_file
from readme_jax.model import moe
from readme_jax.model.decoder import dense_ffn, positions_from_mask, run_layers
from readme_jax.model.router import top1_expert
from readme_jax.nnx_jit import jit_method
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train.losses import distill_loss, router_targets


class LayerwiseMoE(nnx.Module):
    """A ReadMe's embedding, attention and experts with per-layer routers ``routers [L, D, E]`` instead of the
    pre-gating router. ``token_nll(input_ids, targets) -> [B, T]``; ``route(input_ids) -> int32[L, B, T]``."""

    def __init__(self, readme, routers):
        self.config = readme.config
        self.tok, self.attn, self.experts = readme.tok, readme.attn, readme.experts
        self.routers = nnx.Param(jnp.asarray(routers, jnp.float32))

    def hidden_states(self, input_ids):
        """(x [B, T, D], None, expert ids int32[L, B, T]) - every layer plans its own dispatch."""
        E = self.config.num_experts

        def ffn(p, h):
            ids = top1_expert(h.astype(jnp.float32) @ p["w_route"])                    # [B, T]
            plan = moe.plan_dispatch(ids, E)
            return moe.moe_ffn(plan, h, p["w_gate"], p["w_up"], p["w_down"]), ids

        layers = {**self.attn.arrays(), **self.experts.arrays(), "w_route": self.routers[...]}
        mask = jnp.ones(input_ids.shape, bool)
        return run_layers(layers, self.tok.encode(input_ids), positions=positions_from_mask(mask),
                          attention_mask_=mask, cfg=self.config.base, ffn_fn=ffn)

    def token_nll(self, input_ids, targets):
        x, _, _ = self.hidden_states(input_ids)
        return self.tok.nll(x, targets)

    def route(self, input_ids):
        return self.hidden_states(input_ids)[2]

    def router_params(self) -> int:
        return int(self.routers.size)


def ffn_inputs(dense, input_ids: np.ndarray, *, batch: int, progress: bool = True, desc: str = "hidden") -> np.ndarray:
    """The dense parent's FFN inputs (normed hidden states) float32[L, N, T, D] of ``input_ids`` int[N, T]."""
    ffn = lambda p, h: (dense_ffn(p, h)[0], h)
    fwd = jit_method(dense, lambda m, ids: m.hidden_states(ids, ffn_fn=ffn)[2])                # [L, b, T, D]
    out = [np.asarray(fwd(jnp.asarray(input_ids[i:i + batch])))
           for i in tqdm(range(0, len(input_ids), batch), desc=desc, unit="batch", disable=not progress)]
    return np.concatenate(out, axis=1)


def train_layer_routers(hidden: np.ndarray, dist: np.ndarray, mask: np.ndarray, *, steps: int, lr: float,
                        progress: bool = True) -> tuple[np.ndarray, list[float]]:
    """Full-batch Adam on the per-layer distillation loss.

    hidden float32[L, N, D] (FFN inputs), dist float32[L, N, E] (per-layer targets), mask float32[N].
    Returns (routers float32[L, D, E] from zeros, the mean-over-layers loss per step).
    """
    L, N, D = hidden.shape
    E = dist.shape[-1]
    tx = optax.adam(lr)

    def loss_fn(w, h, ds, m):
        logits = jnp.einsum("lnd,lde->lne", h, w)
        per_layer = jax.vmap(lambda lg, d: distill_loss(lg[None], d[None, None], m[None]))(logits, ds)
        return jnp.mean(per_layer)

    @jax.jit
    def step(w, opt, h, ds, m):
        loss, g = jax.value_and_grad(loss_fn)(w, h, ds, m)
        upd, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, upd), opt, loss

    w = jnp.zeros((L, D, E), jnp.float32)
    opt = tx.init(w)
    h, ds, m = jnp.asarray(hidden), jnp.asarray(dist), jnp.asarray(mask, jnp.float32)
    losses = []
    for _ in tqdm(range(steps), desc="layer-wise routers", disable=not progress):
        w, opt, loss = step(w, opt, h, ds, m)
        losses.append(float(loss))
    return np.asarray(w), losses


def per_layer_targets(dense, specific: np.ndarray, windows: np.ndarray, *, batch: int, use_abs: bool) -> np.ndarray:
    """The parent's per-layer target expert int32[L, W, T] of ``windows`` int[W, T] (top-1 of each layer's dist)."""
    spec = jnp.asarray(specific)
    tgt = jit_method(dense, lambda m, ids: top1_expert(router_targets(m, ids, None, spec, use_abs=use_abs)))
    return np.concatenate([np.asarray(tgt(jnp.asarray(windows[i:i + batch])))
                           for i in range(0, len(windows), batch)], axis=1)


def routes(fn, windows: np.ndarray, *, batch: int, axis: int = 0) -> np.ndarray:
    """``fn(ids [b, T])`` over ``windows`` in batches, concatenated along the batch axis ``axis`` of its output."""
    return np.concatenate([np.asarray(fn(jnp.asarray(windows[i:i + batch]))) for i in range(0, len(windows), batch)],
                          axis=axis)


def median_seconds(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))                  # compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def save_routers(path, routers: np.ndarray, losses: list[float]) -> None:
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, routers=routers, losses=np.asarray(losses, np.float32))


def load_routers(path) -> tuple[np.ndarray, list[float]]:
    with np.load(path) as z:
        return z["routers"], [float(x) for x in z["losses"]]


def to_json(x):
    return json.loads(json.dumps(x, default=float))


# ------------------------------------------------------------------------------------- experiment
def _flops_per_token(run, lw: LayerwiseMoE) -> dict[str, float]:
    """Matmul FLOPs per token (2 x weights used; embedding lookups are free): the model, each kind of router."""
    b = run.dense.config
    rc = run.router_config()
    readme_router = 2 * (rc.num_params() - rc.vocab_size * (rc.embed_rank or 0))
    model = 2 * (lw.config.base.num_layers * (3 * b.hidden_size * lw.config.expert_dim)
                 + sum(int(np.prod(v.shape[1:])) * v.shape[0] for v in lw.attn.arrays().values())
                 + b.vocab_size * b.hidden_size)
    return {"model": float(model), "readme_router": float(readme_router), "layerwise_routers": 2.0 * lw.router_params()}


@dataclasses.dataclass(frozen=True)
class LayerwiseSettings:
    """One linear top-1 router [D, E] per layer reading that layer's FFN input, trained on the parent's
    per-layer distillation targets of the router pool, on the dense parent's hidden states (computed once)."""
    steps: int = 300                     # full-batch AdamW updates of all L routers together
    lr: float = 3.0e-3
    redundancy_tokens: int = 1024        # held-out tokens per domain whose per-layer routes are counted


@EXPERIMENTS.register("layerwise", LayerwiseSettings)
def layerwise(parent, settings, *, progress: bool = True) -> dict:
    """Train the layer-wise routers, evaluate the layer-wise MoE on the extracted and the tuned experts against
    Read-ME on the same experts, and measure its routing redundancy (transitions, mutual information, paths)."""
    from readme_jax.eval.perplexity import evaluate_perplexity
    from readme_jax.science.folder import Experiment, markdown_table
    from readme_jax.science.plots import heatmaps, lines
    from readme_jax.science.redundancy import depth_profile, locality, routing_paths, transition_counts
    from readme_jax.train.run import say
    from readme_jax.train.stages import heldout_routing
    from readme_jax.train.trainer import phases

    run = parent
    ev, E = run.cfg.eval, run.masks.num_experts
    domains = list(run.corpus.domains)
    with Experiment(run, "layerwise", {"steps": settings.steps, "lr": settings.lr,
                                       "redundancy_tokens": settings.redundancy_tokens}) as ex:
        rpath = ex.path("routers.npz")
        if rpath.is_file():
            routers, losses = load_routers(rpath)
        else:
            pool = run.router_pool
            say(f"[layerwise] dense parent's FFN inputs of the router pool ({pool.input_ids.size:,} tokens)")
            h = ffn_inputs(run.dense, pool.input_ids, batch=run.cfg.extract.calib_batch, progress=progress)
            L, N, T, D = h.shape
            dist = np.transpose(pool.dist, (1, 0, 2, 3)).reshape(L, N * T, E)
            routers, losses = train_layer_routers(h.reshape(L, N * T, D), dist, pool.loss_mask.reshape(-1),
                                                  steps=settings.steps, lr=settings.lr, progress=progress)
            del h
            save_routers(rpath, routers, losses)
        windows = {d: w[:max(1, settings.redundancy_tokens // w.shape[1])]
                   for d, (w, _) in heldout_routing(run).items()}

        def targets_part():
            return {d: per_layer_targets(run.dense, run.masks.specific, w, batch=ev.batch,
                                         use_abs=run.cfg.train.target_abs).tolist() for d, w in windows.items()}
        tgt = {d: np.asarray(v) for d, v in ex.part("heldout_layer_targets", targets_part).items()}   # [L, W, T]

        def teacher_forced():      # routers on the parent's own hidden states (their training condition)
            acc = {}
            for d, w in windows.items():
                h = ffn_inputs(run.dense, w, batch=ev.batch, progress=False)                      # [L, W, T, D]
                pred = np.argmax(np.einsum("lwtd,lde->lwte", h, routers), -1)
                acc[d] = float((pred == tgt[d]).mean())
            return acc
        tf_acc = ex.part("teacher_forced_accuracy", teacher_forced)

        sched = phases(run.cfg)
        cases = {"extracted experts": ("router_0", sched[0]), "tuned experts": ("final", sched[-1])}
        rows, result = [], {"router_losses": [losses[0], losses[-1]], "teacher_forced_accuracy": tf_acc, "cases": {}}
        mi_curves, heat = {}, {}
        for case, (tag, phase) in cases.items():
            def measure(phase=phase):
                model = run.model_after(phase)
                lw = LayerwiseMoE(model, routers)
                ppl = evaluate_perplexity(lw, run.tokenizer, run.corpus, seq_len=ev.seq_len, max_tokens=ev.max_tokens,
                                          batch_size=ev.batch, progress=progress)
                graphdef, state = nnx.split(lw)
                route_fn = jax.jit(lambda s, ids: nnx.merge(graphdef, s).route(ids))
                rgraph, rstate = nnx.split(model.router)
                rroute = jax.jit(lambda s, ids: nnx.merge(rgraph, s).route(ids))
                lw_ids = {d: routes(lambda x: route_fn(state, x), w, batch=ev.batch, axis=1)
                          for d, w in windows.items()}
                rm_ids = {d: routes(lambda x: rroute(rstate, x), w, batch=ev.batch) for d, w in windows.items()}
                ids = np.concatenate([v.reshape(v.shape[0], -1) for v in lw_ids.values()], axis=1)        # [L, N]
                x = jnp.asarray(next(iter(windows.values()))[:ev.batch])
                fixed = jnp.zeros(x.shape, jnp.int32)
                mg, ms = nnx.split(model)
                t_lw = median_seconds(jax.jit(lambda s, i: nnx.merge(graphdef, s).token_nll(i, i)), state, x)
                t_fixed = median_seconds(
                    jax.jit(lambda s, i: nnx.merge(mg, s).token_nll(i, i, expert_ids=fixed)), ms, x)
                t_routed = median_seconds(jax.jit(lambda s, i: nnx.merge(mg, s).token_nll(i, i)), ms, x)
                return to_json({
                    "ppl": ppl,
                    "accuracy_vs_layer_targets": {d: float((lw_ids[d] == tgt[d]).mean()) for d in domains},
                    "locality_layerwise": float(np.mean([locality(v) for v in lw_ids.values()])),
                    "locality_readme": float(np.mean([locality(v) for v in rm_ids.values()])),
                    "depth": depth_profile(ids, E), "paths": routing_paths(ids),
                    "transitions": [transition_counts(ids[l], ids[l + 1], E).tolist()
                                    for l in range(ids.shape[0] - 1)],
                    "seconds": {"layerwise": t_lw, "readme_fixed_ids": t_fixed, "readme_routed": t_routed}})
            r = ex.part(case.replace(" ", "_"), measure)
            readme_ppl = json.loads(run.eval_path(tag).read_text())["ppl"]
            for d in domains:
                rows.append([case, d, readme_ppl[d]["ppl"], r["ppl"][d]["ppl"],
                             f"{100 * (readme_ppl[d]['ppl'] / r['ppl'][d]['ppl'] - 1):+.1f}%"])
            mi_curves[f"layer-wise, {case}"] = [x["mi"] for x in r["depth"]]
            mi_curves[f"normalised, {case}"] = [x["normalized"] for x in r["depth"]]
            L = len(r["transitions"]) + 1
            if case == "tuned experts":
                shown = sorted({0, L // 3, 2 * L // 3, L - 2} & set(range(L - 1)))
                heat = {f"layer {l} -> {l + 1}": np.asarray(r["transitions"][l]) for l in shown}
            result["cases"][case] = {**r, "readme_ppl": readme_ppl}
        lw_model = LayerwiseMoE(run.model_after(sched[0]), routers)
        flops = _flops_per_token(run, lw_model)
        rc = run.router_config()
        tuned = result["cases"]["tuned experts"]
        sec = tuned["seconds"]
        n_tok = sum(np.asarray(v).size for v in windows.values())
        table = markdown_table(["experts", "domain", "Read-ME ppl", "layer-wise MoE ppl",
                                "Read-ME vs layer-wise (negative: Read-ME lower)"], rows)
        table += "\n\n" + markdown_table(["", "Read-ME router", "layer-wise routers"], [
            ["router params", f"{rc.num_params():,}", f"{lw_model.router_params():,}"],
            ["router FLOPs / token (share of the model's)",
             f"{flops['readme_router']:,.0f} ({100 * flops['readme_router'] / flops['model']:.1f}%)",
             f"{flops['layerwise_routers']:,.0f} ({100 * flops['layerwise_routers'] / flops['model']:.2f}%)"],
            ["forward latency vs fixed routing (tuned, [4, 512] on this CPU)",
             f"{100 * (sec['readme_routed'] / sec['readme_fixed_ids'] - 1):+.1f}%",
             f"{100 * (sec['layerwise'] / sec['readme_fixed_ids'] - 1):+.1f}%"],
            ["routes known before the backbone runs", "yes (pre-gating: prefetch, batching)",
             "no (one layer ahead at best)"],
            ["locality (same expert as the previous token, per 4096)",
             f"{4096 * tuned['locality_readme']:.0f}", f"{4096 * tuned['locality_layerwise']:.0f} (mean over layers)"],
            ["distinct routing paths used / tokens", f"<= {E}",
             f"{tuned['paths']['distinct']:,} / {tuned['paths']['tokens']:,} "
             f"(possible 10^{tuned['paths']['log10_possible']:.0f})"],
            ["adjacent-layer MI, mean (normalised)", "-",
             f"{np.mean([x['mi'] for x in tuned['depth']]):.2f} bits "
             f"({np.mean([x['normalized'] for x in tuned['depth']]):.2f})"],
        ])
        table += (f"\n\nLayer-wise routers trained on the dense parent's hidden states (teacher-forced held-out "
                  f"accuracy vs per-layer targets {np.mean(list(tf_acc.values())):.3f}); evaluated on the MoE's own "
                  f"hidden states. "
                  f"Redundancy counted over {n_tok:,} held-out tokens (plug-in estimates, bits).")
        lines(list(range(1, L)), {k: v for k, v in mi_curves.items()}, ex.path("mutual_information.png"),
                    title="I(S_l; S_l+1) of the layer-wise MoE", xlabel="layer l", ylabel="bits / normalised")
        heatmaps(heat, ex.path("transitions.png"), title="P(expert at l+1 | expert at l), layer-wise MoE, tuned",
                       labels=domains)
        result["flops_per_token"] = flops
        result["router_params"] = {"readme": rc.num_params(), "layerwise": lw_model.router_params()}
        ex.finish(to_json(result), table)
        return result
