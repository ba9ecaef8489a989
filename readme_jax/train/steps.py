"""Jitted train steps of the alternating rounds (pure functions over split NNX state), on a device mesh.

The Read-ME model is split once per phase into ``(graphdef, trainable, frozen)``:

* router phase: ``trainable`` = the router's params (``PathContains('router')``); the backbone is in
  ``frozen`` and is never written, so it stays bitwise unchanged;
* expert phase: ``trainable`` = every param outside the router; the router is frozen.

A step takes ``(trainable, opt_state, frozen, batch, peak_lr)`` and returns new ``(trainable, opt_state)``
plus metrics. Gradient accumulation: batch leaves come as ``[A, b, ...]`` (:func:`microbatches` on the host),
the A micro-batches are scanned, the gradients averaged, then one optimizer update.

Sharding: every step is one ``jax.jit`` with in/out shardings from the rule table of
:mod:`readme_jax.parallel.sharding` (:class:`StepShardings`): params, gradients and optimizer state split by
it (FSDP over "fsdp", the experts' E over "expert"), each micro-batch's b rows split over every mesh axis,
``trainable`` and ``opt_state`` donated. The loss is the global weighted mean under jit, so its gradient is
exact whatever the mesh. The MoE FFN runs as the expert-parallel dispatcher
(:class:`readme_jax.parallel.expert_parallel.ExpertParallel`, a ``jax.shard_map`` with ``all_to_all``) on
every mesh, one device included; its local dispatcher is ``train.dispatcher`` (a registered name) or the
backend's default.

Routing precomputed on the host (expert phase): :class:`ExpertStep` first runs the frozen router on the
step's batch (one jitted call: argmax expert ids ``[A, b, T]`` and the per-device send counts), reads the
counts (one small transfer; a collective across hosts), picks the all_to_all capacity bucket, and calls the
update compiled for that bucket with the ids as an input - the backbone never routes. The router step takes
its targets precomputed (the frozen dense *parent*'s ``dist``, from the pipeline's ``targets`` stage) and runs
only the router.

bf16 compute: :func:`compute_graphdef` re-labels every config dataclass in the module tree with
``dtype='bfloat16'`` (and the run's remat policy), so activations and matmuls run in bf16 while params (the
master copy) and optimizer state stay f32; losses are computed in f32.

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
from jax.sharding import NamedSharding

from readme_jax.errors import TrainingDivergedError
from readme_jax.model import dispatch
from readme_jax.model.router import top1_expert
from readme_jax.parallel import expert_parallel as ep
from readme_jax.parallel import sharding
from readme_jax.parallel.mesh import EXPERT_AXIS, batch_size_of, batch_spec, replicated
from readme_jax.train.losses import distill_loss, router_accuracy

ROUTER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("router"))
BACKBONE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("router")))
# the token embedding and, untied, the LM head: the head loss gives the head no gradient (``head_grad=False``),
# so an untied head left trainable would only decay
BACKBONE_PARAMS_FROZEN_EMBEDDING = nnx.All(BACKBONE_PARAMS, nnx.Not(nnx.PathContains("embed")),
                                           nnx.Not(nnx.PathContains("lm_head")))


def trainable_filter(kind: str, *, freeze_embedding: bool = False):
    """The params a ``kind`` phase trains (expert phases: every backbone param, the token embedding / tied
    LM head too unless ``freeze_embedding``)."""
    if kind == "router":
        return ROUTER_PARAMS
    if kind == "expert":
        return BACKBONE_PARAMS_FROZEN_EMBEDDING if freeze_embedding else BACKBONE_PARAMS
    raise ValueError(f"unknown phase kind {kind!r} (expected 'router' or 'expert')")


def split_for(model: nnx.Module, kind: str, *, freeze_embedding: bool = False):
    """(graphdef, trainable State, frozen State) of ``model`` for a ``kind`` ('router' | 'expert') phase."""
    return nnx.split(model, trainable_filter(kind, freeze_embedding=freeze_embedding), ...)


# ------------------------------------------------------------------------------- compute config
def _with_fields(value: Any, changes: dict[str, Any]) -> Any:
    """A config dataclass (and the config dataclasses inside it) with ``changes`` applied to the fields it
    has (``dtype``, ``remat``); other values as they are."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    out = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if f.name in changes and isinstance(v, str):
            out[f.name] = changes[f.name]
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            nv = _with_fields(v, changes)
            if nv is not v:
                out[f.name] = nv
    return dataclasses.replace(value, **out) if out else value


def _relabel(module: nnx.Module, changes: dict[str, Any]) -> list[tuple[Any, str, Any]]:
    """Apply ``changes`` to every config dataclass held by a module of the tree; returns what to undo."""
    undo = []
    for _, m in nnx.iter_modules(module):
        for name, value in list(vars(m).items()):
            new = _with_fields(value, changes)
            if new is not value:
                undo.append((m, name, value))
                object.__setattr__(m, name, new)
    return undo


def compute_graphdef(model: nnx.Module, dtype: str, filters=None, *, remat: str = "none"):
    """The graphdef of ``model`` with every config's compute dtype set to ``dtype`` and the decoder's remat
    policy to ``remat`` (model/config.py REMAT_POLICIES); the model is left as it was."""
    undo = _relabel(model, {"dtype": dtype, "remat": remat})
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


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where a phase's state lives: NamedSharding trees of ``trainable``, ``opt_state`` and ``frozen``
    (parallel/sharding.py rules) on ``mesh``."""

    mesh: jax.sharding.Mesh
    trainable: Any
    opt_state: Any
    frozen: Any

    @classmethod
    def of(cls, trainable, frozen, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> "StepShardings":
        tr = sharding.param_shardings(trainable, mesh)
        return cls(mesh=mesh, trainable=tr, opt_state=sharding.opt_state_shardings(tx, trainable, tr),
                   frozen=sharding.param_shardings(frozen, mesh))

    def init_opt_state(self, tx: optax.GradientTransformation, trainable):
        """``tx.init(trainable)`` created sharded (never whole on one device)."""
        return jax.jit(tx.init, out_shardings=self.opt_state)(trainable)

    def batch(self, batch: dict) -> dict:
        """Shardings of a step's batch: [A, b, ...] leaves, b split over every mesh axis."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, batch_spec(np.ndim(x), 1)), batch)


# loss_fn(trainable, frozen, micro_batch, **static) -> (loss <f32>[], aux pytree)
LossFn = Callable[..., tuple[jax.Array, Any]]


class TrainStep:
    """``step(trainable, opt_state, frozen, batch, peak_lr, **static)`` -> (trainable, opt_state, metrics):
    the jitted update of ``loss_fn`` over the A micro-batches of ``batch`` ([A, b, ...] leaves).

    One ``jax.jit`` per distinct ``static`` (e.g. the all_to_all capacity), with the in/out shardings of
    ``shardings``; ``trainable`` and ``opt_state`` are donated (XLA writes the new ones into their buffers:
    for the 30-layer expert step ~3 GB not held twice). After a diverged step (:func:`check_finite`) the
    inputs are gone too, and the last checkpoint is the state to go back to. ``compiles``: how many."""

    def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, shardings: StepShardings):
        self.loss_fn, self.tx, self.shardings = loss_fn, tx, shardings
        self._fns: dict[tuple, Callable] = {}

    @property
    def compiles(self) -> int:
        return len(self._fns)

    def _build(self, batch_shardings, static: dict):
        sh = self.shardings
        grad_fn = jax.value_and_grad(lambda tr, fr, mb: self.loss_fn(tr, fr, mb, **static), has_aux=True)

        def step(trainable, opt_state, frozen, batch, peak_lr):
            loss, aux, grads = _accumulate(grad_fn, trainable, frozen, batch)
            new_tr, new_opt, unorm = _apply(self.tx, trainable, opt_state, grads, peak_lr)
            return new_tr, new_opt, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "update_norm": unorm}

        rep = replicated(sh.mesh)
        return jax.jit(step, in_shardings=(sh.trainable, sh.opt_state, sh.frozen, batch_shardings, rep),
                       out_shardings=(sh.trainable, sh.opt_state, rep), donate_argnums=(0, 1))

    def lower(self, trainable, opt_state, frozen, batch, peak_lr, **static):
        """The lowered step (``.compile().memory_analysis()``: the memory plan); arguments may be
        ShapeDtypeStructs."""
        return self._fn(batch, static).lower(trainable, opt_state, frozen, batch, peak_lr)

    def _fn(self, batch, static):
        key = tuple(sorted(static.items()))
        if key not in self._fns:
            self._fns[key] = self._build(self.shardings.batch(batch), static)
        return self._fns[key]

    def __call__(self, trainable, opt_state, frozen, batch, peak_lr, **static):
        return self._fn(batch, static)(trainable, opt_state, frozen, batch, peak_lr)


# -------------------------------------------------------------------------------------- steps
def make_router_step(graphdef, tx: optax.GradientTransformation, shardings: StepShardings) -> TrainStep:
    """The router update ``step(trainable, opt_state, frozen, batch, peak_lr)``.

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
        return distill_loss(logits, dist, mask), {"accuracy": router_accuracy(logits, dist, mask)}

    return TrainStep(loss_fn, tx, shardings)


@dataclasses.dataclass(frozen=True)
class ExpertLoss:
    """What an expert step minimises: ``kind`` 'lm' (next-token CE on the data), 'kd' (T^2 forward KL to the
    dense parent's next-token distribution at temperature T) or 'mix' ((1 - kd_weight) CE + kd_weight
    T^2 KL); ``head_grad``: whether the LM head weight gets a gradient (False with a frozen embedding)."""

    kind: str = "lm"
    kd_weight: float = 0.5
    temperature: float = 1.0
    head_grad: bool = True

    @property
    def teacher(self) -> bool:
        return self.kind != "lm"


class ExpertStep:
    """The expert update with routing precomputed: ``step(trainable, opt_state, frozen, batch, peak_lr)``,
    batch = {input_ids, targets, loss_mask}, each [A, b, T] (``tx`` / ``peak_lr`` / A as in
    :func:`make_router_step`).

    ``route`` (one jitted call) gives the frozen router's expert ids [A, b, T] (argmax, no gradient) and the
    per-device send counts; the host picks the smallest capacity bucket that holds the largest count
    (:func:`readme_jax.parallel.expert_parallel.pick_capacity`) and runs the update compiled for it, the ids
    an input of the step. Returns (trainable, opt_state, metrics {loss, nll, grad_norm, update_norm, load
    <float32>[E] (share of tokens per expert), capacity, padding_rows, dropped}; with a teacher also kl).

    Distillation (``loss.teacher``): ``teacher`` = (graphdef, state) of the frozen dense parent. Its final-normed
    hidden states [A, b, T, D] come from one more jitted call before the update (``teach``, a forward only),
    and its head weight is part of ``frozen``: ``frozen = (the model's frozen State, teacher head)``
    (:meth:`frozen_with_teacher`); the update recomputes the teacher's logits chunk by chunk inside the head
    loss, with the loss's gradient, in its forward (model/head_loss.weighted_loss), so no [N, V] array is ever an
    input or a residual.
    """

    def __init__(self, graphdef, tx: optax.GradientTransformation, shardings: StepShardings, *, num_experts: int,
                 dispatcher: str | None = None, loss: ExpertLoss = ExpertLoss(), teacher: tuple | None = None):
        if loss.teacher and teacher is None:
            raise ValueError(f"ExpertStep: expert loss {loss.kind!r} needs the teacher (graphdef, state)")
        self.graphdef, self.num_experts, self.mesh, self.loss = graphdef, num_experts, shardings.mesh, loss
        self.local_dispatcher = dispatcher       # train.dispatcher: a registered name over the default
        self.update = TrainStep(self._loss, tx, shardings)
        rep = replicated(self.mesh)
        self.route = jax.jit(self._route, in_shardings=(shardings.trainable, shardings.frozen, None),
                             out_shardings=(None, rep))
        self.teacher = teacher if loss.teacher else None
        if self.teacher is not None:
            self.teach = jax.jit(functools.partial(_teacher_hidden, self.teacher[0]))

    @staticmethod
    def frozen_with_teacher(frozen, teacher_model) -> tuple:
        """The ``frozen`` argument of a distillation step: (model's frozen State, {"tok": {head name: W}})."""
        head, vocab_major = teacher_model.tok.head()
        return frozen, {"tok": {"embed" if vocab_major else "lm_head": head}}

    def _model_frozen(self, frozen):
        return frozen[0] if self.teacher is not None else frozen

    def _route(self, trainable, frozen, input_ids):
        model = nnx.merge(self.graphdef, trainable, self._model_frozen(frozen))
        ids = top1_expert(model.router(input_ids.reshape(-1, input_ids.shape[-1]))).reshape(input_ids.shape)
        return ids, ep.dispatch_counts(ids, self.num_experts, self.mesh)

    def dispatcher(self, capacity: int) -> ep.ExpertParallel:
        m = self.mesh.shape[EXPERT_AXIS]
        return ep.ExpertParallel(mesh=self.mesh, capacity=capacity, local=dispatch.default_dispatcher(m * capacity, self.local_dispatcher))

    def _loss(self, trainable, frozen, mb, *, capacity: int):
        model = nnx.merge(self.graphdef, trainable, self._model_frozen(frozen))
        expert_ids = mb["expert_ids"]
        load = jnp.mean(jax.nn.one_hot(expert_ids, self.num_experts, dtype=jnp.float32), axis=(0, 1))
        plan = self.dispatcher(capacity).plan(expert_ids, self.num_experts)     # once, outside the layer scan
        x, _, _ = model.backbone(mb["input_ids"], plan=plan)
        aux = {"load": load, "dropped": plan.dropped.astype(jnp.float32)}
        lf = self.loss
        mask = mb["loss_mask"].astype(jnp.float32)
        w = mask / jnp.maximum(jnp.sum(mask), 1.0)             # lm_loss's mean, its gradient fused into the forward
        if not lf.teacher:
            loss, _, _ = model.tok.weighted_loss(x, mb["targets"], w, head_grad=lf.head_grad)
            return loss, {**aux, "nll": loss}
        a = (0.0 if lf.kind == "kd" else 1.0 - lf.kd_weight) * w
        b = (1.0 if lf.kind == "kd" else lf.kd_weight) * w
        head_t = next(iter(frozen[1]["tok"].values()))
        loss, nll, kl = model.tok.weighted_loss(x, mb["targets"], a, teacher=(mb["teacher_x"], head_t), kl_weights=b,
                                                temperature=lf.temperature, head_grad=lf.head_grad)
        return loss, {**aux, "nll": jnp.sum(nll * w), "kl": jnp.sum(kl * w)}

    def __call__(self, trainable, opt_state, frozen, batch, peak_lr):
        ids, counts = self.route(trainable, frozen, batch["input_ids"])
        extra = {"expert_ids": ids}
        if self.teacher is not None:
            extra["teacher_x"] = self.teach(self.teacher[1], batch["input_ids"])
        A, b, T = batch["input_ids"].shape
        m, dev = self.mesh.shape[EXPERT_AXIS], batch_size_of(self.mesh)
        n_local = b * T // dev
        capacity = ep.pick_capacity(int(np.max(jax.device_get(counts))), ep.capacity_buckets(n_local, m))
        new_tr, new_opt, metrics = self.update(trainable, opt_state, frozen, {**batch, **extra}, peak_lr,
                                               capacity=capacity)
        padding = dev * m * capacity - b * T
        return new_tr, new_opt, {**metrics, "capacity": capacity, "padding_rows": padding}


def _teacher_hidden(graphdef, state, input_ids):
    """The frozen teacher's final-normed hidden states: input_ids <int32>[A, b, T] -> [A, b, T, D]."""
    model = nnx.merge(graphdef, state)
    ids = input_ids.reshape(-1, input_ids.shape[-1])
    x, _, _ = model.hidden_states(ids)
    return jax.lax.stop_gradient(model.tok.head_input(x)).reshape(input_ids.shape + x.shape[-1:])


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
