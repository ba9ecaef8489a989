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
    graphdef, state = nnx.split(dense)

    @jax.jit
    def fwd(state, ids):
        ffn = lambda p, h: (dense_ffn(p, h)[0], h)
        return nnx.merge(graphdef, state).hidden_states(ids, ffn_fn=ffn)[2]              # [L, b, T, D]

    out = [np.asarray(fwd(state, jnp.asarray(input_ids[i:i + batch])))
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
    graphdef, state = nnx.split(dense)
    spec = jnp.asarray(specific)

    @jax.jit
    def tgt(state, ids):
        return top1_expert(router_targets(nnx.merge(graphdef, state), ids, None, spec, use_abs=use_abs))

    return np.concatenate([np.asarray(tgt(state, jnp.asarray(windows[i:i + batch])))
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
