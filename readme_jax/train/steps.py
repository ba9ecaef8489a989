"""Jitted train steps of the alternating rounds (pure functions over split NNX state).

The Read-ME model is split once per phase into ``(graphdef, trainable, frozen)``:

* router phase: ``trainable`` = the router's params (``PathContains('router')``); the backbone is in
  ``frozen`` and is never written, so it stays bitwise unchanged;
* expert phase: ``trainable`` = every param outside the router; the router is frozen.

A step takes ``(trainable, opt_state, frozen, batch, peak_lr)`` and returns new ``(trainable, opt_state)``
plus metrics. Gradient accumulation: batch leaves come as ``[A, b, ...]`` (:func:`microbatches` on the host),
the A micro-batches are scanned, the gradients averaged, then one optimizer update. Data parallelism: with a
mesh, each micro-batch's b rows are split over the "data" axis and the loss and gradients are those of the
whole micro-batch (:mod:`readme_jax.parallel.data_parallel`). The router step takes its targets precomputed (the frozen
dense *parent*'s ``dist``, from the pipeline's ``targets`` stage) and runs only the router; the expert step
routes each micro-batch once with the frozen router (argmax, no gradient) and feeds those ids to every
backbone layer.

bf16 compute: :func:`compute_graphdef` re-labels every config dataclass in the module tree with
``dtype='bfloat16'``, so activations and matmuls run in bf16 while params (the master copy) and optimizer
state stay f32; losses are computed in f32.

A diverged update is never saved: :func:`check_finite` raises :class:`TrainingDivergedError` on a NaN/Inf
loss, gradient or update *before* the caller stores or checkpoints the new state (the step donates its
input state, so the run stops there and resumes from the last good checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from readme_jax.model.router import top1_expert
from readme_jax.parallel import data_parallel
from readme_jax.train.losses import distill_loss, lm_loss, router_accuracy

ROUTER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("router"))
BACKBONE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("router")))


class TrainingDivergedError(RuntimeError):
    """A train step produced a non-finite loss, gradient or update; nothing of that step was kept."""


def trainable_filter(kind: str):
    if kind == "router":
        return ROUTER_PARAMS
    if kind == "expert":
        return BACKBONE_PARAMS
    raise ValueError(f"unknown phase kind {kind!r} (expected 'router' or 'expert')")


def split_for(model: nnx.Module, kind: str):
    """(graphdef, trainable State, frozen State) of ``model`` for a ``kind`` ('router' | 'expert') phase."""
    return nnx.split(model, trainable_filter(kind), ...)


# ------------------------------------------------------------------------------------- dtype
def _with_dtype(value: Any, dtype: str) -> Any:
    """A config dataclass (and the config dataclasses inside it) with compute ``dtype``; others as is."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    changes = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if f.name == "dtype" and isinstance(v, str):
            changes["dtype"] = dtype
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            nv = _with_dtype(v, dtype)
            if nv is not v:
                changes[f.name] = nv
    return dataclasses.replace(value, **changes) if changes else value


def _relabel(module: nnx.Module, dtype: str) -> list[tuple[Any, str, Any]]:
    """Set ``dtype`` on every config dataclass held by a module of the tree; returns what to undo."""
    undo = []
    for _, m in nnx.iter_modules(module):
        for name, value in list(vars(m).items()):
            new = _with_dtype(value, dtype)
            if new is not value:
                undo.append((m, name, value))
                object.__setattr__(m, name, new)
    return undo


def compute_graphdef(model: nnx.Module, dtype: str, filters=None):
    """The graphdef of ``model`` with every config's compute dtype set to ``dtype`` (model left as it was)."""
    undo = _relabel(model, dtype)
    try:
        graphdef = nnx.graphdef(model) if filters is None else nnx.split(model, *filters)[0]
    finally:
        for m, name, value in reversed(undo):
            object.__setattr__(m, name, value)
    return graphdef


# ------------------------------------------------------------------------------------ helpers
def microbatches(x: np.ndarray, n: int) -> np.ndarray:
    """Host-side ``[A * b, ...] -> [A, b, ...]`` (A = n micro-batches), the layout the steps take."""
    x = np.asarray(x)
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} sequences is not a multiple of grad_accum={n}")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _accumulate(grad_fn: Callable, trainable, frozen, micro: dict):
    """Mean of ``grad_fn(trainable, frozen, mb) -> ((loss, aux), grads)`` over the leading (micro-batch)
    axis of ``micro`` (one lax.scan, so the loss is traced once whatever the count)."""
    n = jax.tree.leaves(micro)[0].shape[0]
    if n == 1:
        (loss, aux), grads = grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], micro))
        return loss, aux, grads
    shapes = jax.eval_shape(grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, mb):
        out = grad_fn(trainable, frozen, mb)
        return jax.tree.map(jnp.add, carry, out), None

    ((loss, aux), grads), _ = jax.lax.scan(body, zeros, micro)
    inv = 1.0 / n
    return loss * inv, jax.tree.map(lambda a: a * inv, aux), jax.tree.map(lambda g: g * inv, grads)


def _apply(tx: optax.GradientTransformation, trainable, opt_state, grads, lr_scale):
    updates, opt_state = tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    return optax.apply_updates(trainable, updates), opt_state, optax.tree.norm(updates)


def _jit_step(loss_fn, tx, mesh):
    """The jitted update ``step(trainable, opt_state, frozen, batch, peak_lr)`` of a weighted-mean loss;
    batch leaves are [A, b, ...] (A micro-batches of b rows, b split over the mesh's "data" axis).

    ``trainable`` and ``opt_state`` are donated: XLA writes the new ones into their buffers (for the
    30-layer expert step that is ~3 GB of params and AdamW moments not held twice). Callers use the
    returned state; after a diverged step (:func:`check_finite`) the inputs are gone too, and the last
    checkpoint is the state to go back to."""
    grad_fn = data_parallel.value_and_grad(loss_fn, mesh=mesh)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch, peak_lr):
        loss, aux, grads = _accumulate(grad_fn, trainable, frozen, batch)
        new_tr, new_opt, unorm = _apply(tx, trainable, opt_state, grads, peak_lr)
        return new_tr, new_opt, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "update_norm": unorm}

    return step


# -------------------------------------------------------------------------------------- steps
def make_router_step(graphdef, tx: optax.GradientTransformation, *, mesh: jax.sharding.Mesh | None = None):
    """Jitted ``step(trainable, opt_state, frozen, batch, peak_lr)``.

    ``tx`` is the unit-lr optimizer of :func:`readme_jax.train.optim.make_optimizer` (peak 1); its updates are
    scaled by the traced ``peak_lr`` <float32>[], so one compiled step serves every round.
    trainable / frozen: the Read-ME state split by :func:`split_for` (kind 'router');
    batch = {input_ids <int32>[A, b, T], dist <float32>[A, b, L, T, E]}: A micro-batches (gradient
    accumulation, :func:`microbatches`) and the precomputed distillation targets of those sequences
    (:func:`readme_jax.train.losses.router_targets` of the frozen dense parent, batch-major, as the pipeline's
    ``targets`` stage stores them). Only the router runs here: no dense model is involved.
    Returns (trainable, opt_state, metrics {loss, accuracy, grad_norm, update_norm}).
    """

    def loss_fn(trainable, frozen, mb):
        ids = mb["input_ids"]
        dist = jnp.swapaxes(mb["dist"].astype(jnp.float32), 0, 1)    # [L, b, T, E], as distill_loss takes it
        mask = jnp.ones(ids.shape, jnp.float32)
        logits = nnx.merge(graphdef, trainable, frozen).router(ids)
        return (distill_loss(logits, dist, mask), jnp.sum(mask),
                {"accuracy": router_accuracy(logits, dist, mask)})

    return _jit_step(loss_fn, tx, mesh)


def make_expert_step(graphdef, tx: optax.GradientTransformation, *, num_experts: int,
                     mesh: jax.sharding.Mesh | None = None):
    """Jitted ``step(trainable, opt_state, frozen, batch, peak_lr)``, batch = {input_ids, targets, loss_mask},
    each [A, b, T] (``tx`` / ``peak_lr`` / A as in :func:`make_router_step`).

    Routes come from the frozen router once per micro-batch (argmax, no gradient) and are passed to the
    backbone as ``expert_ids``; with a mesh, each device routes and dispatches its own rows. Returns
    (trainable, opt_state, metrics {loss, grad_norm, update_norm, load <float32>[E] (share of tokens per
    expert)}).
    """

    def loss_fn(trainable, frozen, mb):
        ids = mb["input_ids"]
        model = nnx.merge(graphdef, trainable, frozen)
        expert_ids = jax.lax.stop_gradient(top1_expert(model.router(ids)))
        load = jnp.mean(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=(0, 1))
        loss, count = lm_loss(model.token_nll(ids, mb["targets"], expert_ids=expert_ids), mb["loss_mask"])
        return loss, count, {"load": load}

    return _jit_step(loss_fn, tx, mesh)


# ------------------------------------------------------------------------------------- checks
def check_finite(metrics: dict, *, phase: str, step: int) -> dict:
    """Host copies of the scalar metrics; :class:`TrainingDivergedError` if loss / norms are not finite."""
    host = {k: np.asarray(jax.device_get(v)) for k, v in metrics.items()}
    bad = [k for k in ("loss", "grad_norm", "update_norm") if k in host and not np.all(np.isfinite(host[k]))]
    if bad:
        vals = ", ".join(f"{k}={float(host[k])}" for k in bad)
        raise TrainingDivergedError(
            f"{phase}, step {step}: non-finite {vals}. The update was discarded and nothing of this step was "
            f"saved; the last good checkpoint is intact. Lower the learning rate (train.*_lr), enable "
            f"train.grad_clip, or use float32 compute (train.dtype).")
    return {k: (float(v) if v.ndim == 0 else v.tolist()) for k, v in host.items()}


def lr_at(peak_lr: float, steps: int, step: int) -> float:
    """The learning rate of update ``step`` under optim.schedule (for logs)."""
    if not math.isfinite(peak_lr):
        return peak_lr
    frac = min(step, steps) / max(steps, 1)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * frac))
