"""The alternating rounds: ``router_0, expert_0, router_1, expert_1, ...``, each resumable mid-round.

One phase = one round of one kind:

* ``router_r``: ``train.router_steps`` updates of the router only, distillation loss against the targets
  the pipeline's ``targets`` stage precomputed once from the frozen dense parent (a :class:`RouterPool`);
  batches are drawn from that pool (:class:`PoolSampler`), and no dense model runs during the round;
* ``expert_r``: ``train.expert_steps`` updates of everything but the router, LM loss through the MoE
  backbone routed by the frozen router.

Expert phases train on the mixed-domain stream (``readme_jax.data.pipeline.mixed_dataset``), router phases
on the pool, each phase with its own seed. Each checkpoints (``checkpointing.PhaseCheckpoints``) every
``train.checkpoint_seconds`` of training and / or ``train.checkpoint_every`` updates
(``checkpointing.Cadence``), written in the background with ``train.async_checkpoint`` (off by default), and at
its end (``done``, waited for). Rerunning resumes a phase from its latest checkpoint: params, optimizer state,
step, the data position (grain iterator state for expert phases, the pool sample position for router phases)
and the RNG are restored, and the metrics log is cut back to that step, so a resumed run ends with the same
``metrics.jsonl`` (timings aside) and the same weights as an uninterrupted one.

Faults are injected through :class:`readme_jax.train.hooks.TrainHooks` (``Trainer(hooks=...)``): a learning-
rate scale per update, a call before each checkpoint write and one after each update.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.config import Config
from readme_jax.errors import CheckpointError
from readme_jax.parallel.mesh import replicated, shard_batch
from readme_jax.parallel.sharding import place
from readme_jax.train import steps as steps_lib
from readme_jax.train.checkpointing import Cadence, PhaseCheckpoints, phase_done, remove_tmp_dirs
from readme_jax.train.hooks import TrainHooks
from readme_jax.train.metrics_log import MetricsLog
from readme_jax.train.optim import make_optimizer, round_lr
from readme_jax.train.preflight import train_mesh
from readme_jax.train.profiling import Profiler
from readme_jax.train.targets import PoolSampler, RouterPool
from readme_jax.train.throughput import Throughput


# ------------------------------------------------------------------------------------------ phases
@dataclasses.dataclass(frozen=True)
class Phase:
    kind: str          # "router" | "expert"
    round: int
    steps: int
    batch: int
    peak_lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.round}"


def phases(cfg: Config) -> list[Phase]:
    """The alternating schedule of ``cfg.train``: router_0, expert_0, router_1, ..."""
    t = cfg.train
    out = []
    for r in range(t.rounds):
        out.append(Phase("router", r, t.router_steps, t.router_batch, round_lr(t.router_lr, t.lr_decay, r),
                         t.seed + 1000 * r + 1))
        out.append(Phase("expert", r, t.expert_steps, t.expert_batch, round_lr(t.expert_lr, t.lr_decay, r),
                         t.seed + 1000 * r + 2))
    return out


class Trainer:
    """Runs phases on one Read-ME model in place (see the module docstring).

    Args:
      cfg: the run config; run_dir: where ``checkpoints/`` live; model: the ReadMe (updated in place);
      pool: the :class:`RouterPool` router phases sample from (None: only expert phases / loading);
      specific <bool>[E, L, F]; corpus, tokenizer: data (expert phases); log: the run's MetricsLog;
      hooks: the :class:`~readme_jax.train.hooks.TrainHooks` called during each phase (default: none).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, model, pool: RouterPool | None, specific: np.ndarray,
                 corpus, tokenizer, log: MetricsLog, *, progress: bool = True, hooks: TrainHooks | None = None,
                 teacher=None):
        self.cfg, self.run_dir, self.model, self.pool, self.teacher = cfg, Path(run_dir), model, pool, teacher
        self.specific = jnp.asarray(specific, bool)
        self.corpus, self.tokenizer, self.log, self.progress = corpus, tokenizer, log, progress
        self.hooks = TrainHooks() if hooks is None else hooks
        self._steps: dict[str, tuple[Callable, Any]] = {}
        self.mesh = train_mesh(cfg)

    def _step_fn(self, phase: Phase, graphdef, trainable, frozen):
        """(step, unit-lr optimizer, StepShardings) of the phase's kind, built once and reused by every round."""
        t = self.cfg.train
        if phase.kind not in self._steps:
            tx = make_optimizer(1.0, phase.steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
            sh = steps_lib.StepShardings.of(trainable, frozen, tx, self.mesh)
            if phase.kind == "router":
                fn = steps_lib.make_router_step(graphdef, tx, sh)
            else:
                loss = steps_lib.ExpertLoss(t.expert_loss, t.kd_weight, t.kd_temperature,
                                            head_grad=not t.freeze_embedding)
                fn = steps_lib.ExpertStep(graphdef, tx, sh, num_experts=int(self.specific.shape[0]),
                                          dispatcher=t.dispatcher, loss=loss,
                                          teacher=nnx.split(self.teacher) if loss.teacher else None)
            self._steps[phase.kind] = (fn, tx, sh)
        return self._steps[phase.kind]

    def checkpoints(self, phase: Phase) -> PhaseCheckpoints:
        t = self.cfg.train
        return PhaseCheckpoints(phase_dir(self.run_dir, phase), async_write=t.async_checkpoint,
                                max_to_keep=t.keep_checkpoints)

    def is_done(self, phase: Phase) -> bool:
        return phase_done(phase_dir(self.run_dir, phase))

    def _split(self, phase: Phase):
        return steps_lib.split_for(self.model, phase.kind, freeze_embedding=self.cfg.train.freeze_embedding)

    def _layout(self, phase: Phase) -> dict:
        """What an expert phase's checkpoint records about the form of its params (router phases: nothing)."""
        return {"experts": "tied" if self.model.tied else "fused"} if phase.kind == "expert" else {}

    def _check_layout(self, phase: Phase, ck: PhaseCheckpoints) -> None:
        """A clear refusal when the phase's checkpoint holds experts in another form than this model's."""
        meta = ck.meta()
        want = self._layout(phase).get("experts")
        have = None if meta is None else meta.get("experts", "fused")   # written before tied experts: fused
        if want is not None and have is not None and have != want:
            raise CheckpointError(
                f"{ck.directory}: its checkpoint holds {have} experts"
                f"{' (written before train.experts existed)' if 'experts' not in meta else ''}, this run asks "
                f"for train.experts={want}; rerun with train.experts={have} to resume it, or use another --run-dir")

    def load_done(self, phase: Phase, step: int | None = None) -> None:
        """Put a completed phase's final trainable params (or those of its kept checkpoint ``step``) into the
        model."""
        _, trainable, _ = self._split(phase)
        ck = self.checkpoints(phase)
        self._check_layout(phase, ck)
        params, _, _ = ck.restore(trainable, step=step)
        nnx.update(self.model, params)

    def _dataset(self, phase: Phase):
        if phase.kind == "router":
            if self.pool is None:
                raise ValueError(f"{phase.name}: a router phase needs the router pool (Trainer(pool=...))")
            return PoolSampler(self.pool, phase.batch, phase.seed)
        from readme_jax.data.pipeline import mixed_dataset
        weights = None if self.cfg.train.mixture == "natural" else [1.0] * len(self.corpus.domains)
        return mixed_dataset(self.corpus, self.tokenizer, self.cfg.train.seq_len, phase.batch, phase.seed,
                             split="train", weights=weights)

    def run(self, phase: Phase) -> None:
        """Train ``phase`` to its end, resuming from its latest checkpoint if there is one."""
        t = self.cfg.train
        ckdir = phase_dir(self.run_dir, phase)
        remove_tmp_dirs(ckdir)
        ck = self.checkpoints(phase)
        graphdef, trainable, frozen = self._split(phase)
        if t.dtype != "float32" or t.remat != "none":
            filt = steps_lib.trainable_filter(phase.kind, freeze_embedding=t.freeze_embedding)
            graphdef = steps_lib.compute_graphdef(self.model, t.dtype, (filt, ...), remat=t.remat)
        if phase.kind == "expert" and t.expert_loss != "lm":
            frozen = steps_lib.ExpertStep.frozen_with_teacher(frozen, self.teacher)
        step_fn, tx, sh = self._step_fn(phase, graphdef, trainable, frozen)
        # Placed up front by the rule table (sharded over the mesh), so the first and later calls share one
        # compiled step and no device ever holds the whole optimizer state.
        trainable, frozen = place(trainable, sh.trainable), place(frozen, sh.frozen)
        opt_state = sh.init_opt_state(tx, trainable)
        it = iter(self._dataset(phase))
        rng = jax.random.fold_in(jax.random.key(t.seed), 2 * phase.round + (phase.kind == "expert"))
        start = 0
        if ck.latest_step() is not None:      # restored straight into this mesh's shardings (any saving mesh)
            self._check_layout(phase, ck)
            trainable, opt_state, meta = ck.restore(trainable, opt_state)
            if meta.get("done"):
                nnx.update(self.model, trainable)
                return
            it.set_state(meta["data_state"])
            rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
            start = int(meta["step"])
            tqdm.write(f"[{phase.name}] resuming at step {start}/{phase.steps} from {ckdir}/{start}")
        self.log.drop(lambda r: r.get("phase") == phase.name and r.get("step", 0) > start)

        peak = place(jnp.asarray(phase.peak_lr, jnp.float32), replicated(self.mesh))
        keys = ("input_ids", "dist") if phase.kind == "router" else ("input_ids", "targets", "loss_mask")

        def run_step(tr, opt, b, peak_lr):
            micro = {k: steps_lib.microbatches(b[k], t.grad_accum) for k in keys}     # [A, b, ...]
            return step_fn(tr, opt, frozen, shard_batch(micro, self.mesh, axis=1), peak_lr)
        profiler = Profiler(self.run_dir / "profile" / phase.name, t.profile_steps, first=start + 1)
        hooks = self.hooks
        bar = tqdm(range(start, phase.steps), desc=phase.name, initial=start, total=phase.steps,
                   disable=not self.progress, unit="step")
        tokens_per_step = phase.batch * t.seq_len
        rate = Throughput.of(self.model, seq_len=t.seq_len, dtype=t.dtype, devices=self.mesh.devices.size) \
            if phase.kind == "expert" else None
        cadence = Cadence(t.checkpoint_every, t.checkpoint_seconds)
        try:
            for step in bar:
                batch = next(it)
                t0 = time.perf_counter()
                scale = hooks.lr_scale(phase.name, step + 1)
                peak_lr = phase.peak_lr if scale == 1.0 else phase.peak_lr * scale
                step_peak = peak if scale == 1.0 else place(jnp.asarray(peak_lr, jnp.float32), replicated(self.mesh))
                profiler.before(step)
                new_tr, new_opt, metrics = run_step(trainable, opt_state, batch, step_peak)
                host = steps_lib.check_finite(metrics, phase=phase.name, step=step + 1)   # raises before adopting
                trainable, opt_state = new_tr, new_opt
                rng, _ = jax.random.split(rng)
                dt = time.perf_counter() - t0
                record = {"event": "step", "phase": phase.name, "kind": phase.kind, "round": phase.round,
                          "step": step + 1, "lr": steps_lib.lr_at(peak_lr, phase.steps, step),
                          **{k: v for k, v in host.items()}, "tokens": tokens_per_step, "seconds": round(dt, 3),
                          "tokens_per_s": round(tokens_per_step / max(dt, 1e-9), 2)}
                if rate is not None:
                    record.update(rate.of_step(tokens=tokens_per_step, seconds=dt))
                if "domain" in batch and phase.kind == "expert":
                    record["domains"] = np.bincount(np.asarray(batch["domain"]).ravel(),
                                                    minlength=self.specific.shape[0]).tolist()
                self.log.write(record)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"mfu": f"{record['mfu']:.2f}"} if rate is not None else {}))
                done = step + 1 == phase.steps
                if done or cadence.due(step + 1):
                    meta = {**self._layout(phase),
                            "phase": phase.name, "round": phase.round, "kind": phase.kind, "steps": phase.steps,
                            "done": done, "data_state": _jsonable(it.get_state()),
                            "rng": np.asarray(jax.random.key_data(rng)).tolist(), "loss": host["loss"]}
                    self._checkpoint(ck, phase, step + 1, trainable, opt_state, meta)
                    cadence.saved()
                profiler.after(step, new_tr)
                hooks.on_step(phase.name, step + 1)
        finally:          # a pending asynchronous write ends (or fails) before the phase returns or raises
            ck.close()
        profiler.stop()
        bar.close()
        nnx.update(self.model, trainable)

    def _checkpoint(self, ck: PhaseCheckpoints, phase: Phase, step: int, trainable, opt_state, meta: dict) -> None:
        """Save update ``step``'s checkpoint; at the phase's end (``meta["done"]``) wait until it is final, so
        the phase counts as done only on disk. An OSError (a full disk, ...) becomes a CheckpointError naming
        the last good checkpoint, which is still the latest (checkpointing's module doc)."""
        try:
            self.hooks.before_checkpoint(phase.name, step)
            ck.save(step, trainable, opt_state, meta)
            if meta["done"]:
                ck.wait()
        except OSError as e:
            remove_tmp_dirs(ck.directory)
            kept = ck.latest_step()
            raise CheckpointError(
                f"{ck.directory}/{step}: writing the checkpoint failed ({e.strerror or e}"
                f"{': ' + str(e.filename) if e.filename else ''}); "
                + (f"the last good checkpoint is step {kept}, and rerunning the same command resumes "
                   "from it" if kept is not None else "rerunning the same command restarts the phase")
            ) from e


def phase_dir(run_dir: str | Path, phase: Phase) -> Path:
    """``<run_dir>/checkpoints/<phase name>``: where a phase's checkpoints live."""
    return Path(run_dir) / "checkpoints" / phase.name


def _jsonable(state: Any) -> Any:
    """A grain iterator state as plain JSON (bytes -> latin-1 str is not needed for grain's dict state)."""
    return json.loads(json.dumps(state))
