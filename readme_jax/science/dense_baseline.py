"""The equal-size dense baseline (paper Table 5): the dense parent with every FFN pruned to one expert's width.

Channels: per layer the ``Fe = masks.expert_dim`` (= round(keep_ratio * F)) channels of highest calibration
score over all domains together (the token-weighted mean of the per-domain scores of stage 'stats', the
statistic the experts were cut by), so the model has exactly Read-ME's active parameter count. Like for like
with Read-ME's experts: the down-projections refit in closed form (``extract.refit_pruned`` on the Gram of all
domains together) when the parent refit its experts; tuning with the LM loss (a parent tuned with distillation
is refused) on Read-ME's expert schedule (batch, per-round peak lr and cosine, data seeds and domain mixture,
so the same sequences in the same order), all parameters trainable, AdamW with the run's weight decay and
clipping, for the same wall time (``equal_wall_time``: each round's steps scaled by the ratio of the two
models' measured step seconds; the baseline's step is cheaper, so it sees more tokens) or the same steps.
Resumable by parts: the measured step time and the tuned model are kept in the experiment's folder.

    python -m readme_jax.science dense_baseline --run-dir runs/default
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.model.llama import Llama
from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train import steps as steps_lib
from readme_jax.train.optim import make_optimizer
from readme_jax.train.preflight import train_mesh
from readme_jax.train.run import Run, say
from readme_jax.errors import PipelineError
from readme_jax.train.trainer import phases


def pooled_scores(scores: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per-domain channel scores float[E, L, F] (each over ``tokens[e]`` tokens) -> all domains together [L, F]."""
    w = np.asarray(tokens, np.float64) / np.sum(tokens)
    return np.einsum("e,elf->lf", w, np.asarray(scores, np.float64))


def kept_channels(scores: np.ndarray, width: int) -> np.ndarray:
    """<int32>[L, width]: per layer the ``width`` channels of highest score (ties to the lower index), sorted."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :width]
    return np.sort(order, axis=-1).astype(np.int32)


def prune_ffn(dense: Llama, channels: np.ndarray) -> Llama:
    """A Llama equal to ``dense`` but with FFN channels ``channels`` <int32>[L, Fe] only (intermediate_size Fe)."""
    L, fe = channels.shape
    cfg = dense.config.replace(intermediate_size=fe)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    idx = jnp.asarray(channels)
    ffn = dense.ffn.arrays()
    take = jax.vmap(lambda w, i, axis: jnp.take(w, i, axis=axis), in_axes=(0, 0, None))
    params = {"tok": nnx.to_pure_dict(nnx.state(dense.tok, nnx.Param)),
              "attn": nnx.to_pure_dict(nnx.state(dense.attn, nnx.Param)),
              "ffn": {"w_gate": take(ffn["w_gate"], idx, 1), "w_up": take(ffn["w_up"], idx, 1),
                      "w_down": take(ffn["w_down"], idx, 0)}}
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _phase_step(model: nnx.Module, run: Run, phase, mesh):
    """(step, trainable, frozen, opt_state, peak lr, batches) of LM-loss tuning of ``model`` for one expert Phase
    (steps, batch, peak lr, seed), with the run's data stream, mixture and optimizer settings; what Read-ME's
    expert step trains (every param, the tied embedding / head kept as it is with ``train.freeze_embedding``)
    and its loss as that step computes it (``tok.weighted_loss``), so equal wall time compares like with like."""
    from readme_jax.data.pipeline import mixed_dataset
    from readme_jax.parallel.mesh import replicated
    from readme_jax.parallel.sharding import place
    t = run.cfg.train
    graphdef, trainable, frozen = steps_lib.split_for(model, "expert", freeze_embedding=t.freeze_embedding)

    def loss_fn(tr, fr, mb):                      # as Read-ME's expert step: the head's gradient in its forward
        model = nnx.merge(graphdef, tr, fr)
        x, _, _ = model.hidden_states(mb["input_ids"])
        mask = mb["loss_mask"].astype(jnp.float32)
        loss, _, _ = model.tok.weighted_loss(x, mb["targets"], mask / jnp.maximum(jnp.sum(mask), 1.0),
                                             head_grad=not t.freeze_embedding)
        return loss, {}

    weights = None if t.mixture == "natural" else [1.0] * len(run.corpus.domains)
    tx = make_optimizer(1.0, phase.steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    sh = steps_lib.StepShardings.of(trainable, frozen, tx, mesh)
    step = steps_lib.TrainStep(loss_fn, tx, sh)
    trainable, frozen = place(trainable, sh.trainable), place(frozen, sh.frozen)
    opt_state = sh.init_opt_state(tx, trainable)
    peak = place(jnp.asarray(phase.peak_lr, jnp.float32), replicated(mesh))
    batches = iter(mixed_dataset(run.corpus, run.tokenizer, t.seq_len, phase.batch, phase.seed, split="train",
                                 weights=weights))
    return step, trainable, frozen, opt_state, peak, batches


def _update(step, trainable, frozen, opt_state, peak, batch, run: Run, mesh):
    from readme_jax.parallel.mesh import shard_batch
    micro = {k: steps_lib.microbatches(batch[k], run.cfg.train.grad_accum)
             for k in ("input_ids", "targets", "loss_mask")}
    return step(trainable, opt_state, frozen, shard_batch(micro, mesh, axis=1), peak)


def tune_lm(model: nnx.Module, run: Run, schedule: list, *, log, progress: bool = True) -> None:
    """LM-loss tuning of ``model`` (in place; what Read-ME's expert step trains, see ``_phase_step``) over
    ``schedule`` (expert Phases: steps, batch, peak lr, seed), with the run's data stream, mixture, optimizer
    settings and mesh."""
    mesh = train_mesh(run.cfg)
    for phase in schedule:
        step, trainable, frozen, opt_state, peak, batches = _phase_step(model, run, phase, mesh)
        for i in tqdm(range(phase.steps), desc=f"dense baseline {phase.name}", disable=not progress):
            b = next(batches)
            t0 = time.perf_counter()
            trainable, opt_state, metrics = _update(step, trainable, frozen, opt_state, peak, b, run, mesh)
            host = steps_lib.check_finite(metrics, phase=f"dense baseline {phase.name}", step=i + 1)
            log({"phase": phase.name, "step": i + 1, "loss": float(host["loss"]),
                 "seconds": round(time.perf_counter() - t0, 3)})
        nnx.update(model, trainable)


def step_seconds(model: nnx.Module, run: Run, phase, *, steps: int = 3) -> float:
    """Median seconds of one tuning update of ``model`` (``phase``'s batch), over ``steps`` updates after the
    one that compiles, on a copy of its params (``model`` is not changed)."""
    mesh = train_mesh(run.cfg)
    step, trainable, frozen, opt_state, peak, batches = _phase_step(model, run, phase, mesh)
    trainable = jax.tree.map(jnp.copy, trainable)          # the step donates its inputs: never the model's own
    times = []
    for _ in range(steps + 1):
        b = next(batches)
        t0 = time.perf_counter()
        trainable, opt_state, metrics = _update(step, trainable, frozen, opt_state, peak, b, run, mesh)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


@dataclasses.dataclass(frozen=True)
class DenseBaselineSettings:
    """The equal-size dense model: the parent's FFN pruned to one expert's width by the statistics of all
    domains together, its down-projection refit as Read-ME's experts are (when the parent's
    ``extract.refit``), tuned with the LM loss on Read-ME's expert-tuning schedule (per-round peak lr and
    cosine, same data order) with ``equal_wall_time``: each round's steps scaled by Read-ME's median expert
    step seconds (the parent's metrics) over the baseline's own (measured here, 3 updates after a compile),
    so both get the same tuning wall time (else the same steps)."""
    expert_lr: float | None = None       # null: the parent run's train.expert_lr
    equal_wall_time: bool = True


@EXPERIMENTS.register("dense_baseline", DenseBaselineSettings)
def dense_baseline(parent: Run, settings, *, progress: bool = True) -> dict:
    """Prune, refit, tune, evaluate; the table compares held-out perplexity per domain with the dense parent and
    Read-ME (router_0 and final) of the parent run."""
    from readme_jax.convert.checkpoint import save_checkpoint
    from readme_jax.convert.load import load_pretrained
    from readme_jax.eval.perplexity import evaluate_perplexity
    from readme_jax.extract.refit import refit_pruned
    from readme_jax.science.variants import steady_step_seconds
    run = parent
    t = run.cfg.train
    if t.expert_loss != "lm":
        raise PipelineError(f"dense_baseline: the parent tuned its experts with train.expert_loss={t.expert_loss}; "
                            "the baseline is tuned with the LM loss only, so it would not be like for like")
    lr = settings.expert_lr if settings.expert_lr is not None else t.expert_lr
    schedule = [dataclasses.replace(p, peak_lr=p.peak_lr * lr / t.expert_lr)
                for p in phases(run.cfg) if p.kind == "expert"]
    refit = run.cfg.extract.refit
    domains = list(run.corpus.domains)
    with Experiment(run, "dense_baseline", {"expert_lr": lr, "schedule": [dataclasses.asdict(p) for p in schedule],
                                            "refit": refit, "equal_wall_time": settings.equal_wall_time}) as ex:
        model_dir = ex.path("model")

        @functools.cache
        def pruned():
            """The pruned parent, its down-projections refit (or as cut)."""
            if not run.scores_path.is_file():
                raise PipelineError(f"{run.scores_path}: missing; the parent run has no statistics")
            with np.load(run.scores_path) as z:
                scores, tokens = z["scores"], z["tokens"]
            channels = kept_channels(pooled_scores(scores, tokens), run.masks.expert_dim)
            model = prune_ffn(run.dense, channels)
            if refit:
                if not run.grams_path.is_file():
                    raise PipelineError(f"{run.grams_path}: missing; extract.refit needs the parent's stage 'stats'")
                w = model.ffn.w_down
                w.set_value(jnp.asarray(refit_pruned(np.asarray(run.dense.ffn.w_down[...]),
                                                     np.load(run.grams_path, mmap_mode="r"), tokens, channels,
                                                     ridge=run.cfg.extract.refit_ridge), w[...].dtype))
            return model

        timing = None
        if settings.equal_wall_time:
            timing = ex.part("wall_time", lambda: {"readme_step_seconds": steady_step_seconds(run, "expert"),
                                                   "baseline_step_seconds": step_seconds(pruned(), run, schedule[0])})
            ratio = timing["readme_step_seconds"] / timing["baseline_step_seconds"]
            schedule = [dataclasses.replace(p, steps=max(1, round(p.steps * ratio))) for p in schedule]
        if (model_dir / "config.json").is_file():
            model, _ = load_pretrained(model_dir, dtype=None)
        else:
            model = pruned()
            say(f"[dense_baseline] FFN {run.dense.config.intermediate_size} -> {model.config.intermediate_size} "
                f"channels per layer"
                f"{' (refit)' if refit else ''}; {model.num_params():,} params; tuning "
                f"{sum(p.steps for p in schedule)} steps x {schedule[0].batch} x {t.seq_len} tokens")
            losses = []
            tune_lm(model, run, schedule, log=losses.append, progress=progress)
            save_checkpoint(model_dir, model, tokenizer=run.tokenizer, kind="dense", overwrite=True)
            ex.part("losses", lambda: losses)
        ppl = ex.part("ppl", lambda: evaluate_perplexity(
            model, run.tokenizer, run.corpus, seq_len=run.cfg.eval.seq_len, max_tokens=run.cfg.eval.max_tokens,
            batch_size=run.cfg.eval.batch, progress=progress))
        evals = {tag: json.loads(run.eval_path(tag).read_text())["ppl"] for tag in ("dense", "router_0", "final")}
        cols = {"dense parent": evals["dense"], "equal-size dense (tuned)": ppl,
                "Read-ME, no tuning": evals["router_0"], "Read-ME (tuned)": evals["final"]}
        rows = [[d, *[cols[c][d]["ppl"] for c in cols],
                 "yes" if evals["final"][d]["ppl"] < ppl[d]["ppl"] else "no"] for d in domains]
        wins = sum(r[-1] == "yes" for r in rows)
        table = markdown_table(["domain", *cols, "Read-ME below equal-size dense"], rows)
        table += (f"\n\nRead-ME below the equal-size dense baseline in {wins} of {len(domains)} domains (paper: 7 of 7). "
                  f"Active params: equal-size dense {model.num_params():,}; tuning tokens "
                  f"{sum(p.steps * p.batch for p in schedule) * t.seq_len:,} ({sum(p.steps for p in schedule)} "
                  f"steps; Read-ME: {t.expert_steps * t.rounds})"
                  + ("" if timing is None else f", equal wall time: Read-ME's expert step "
                     f"{timing['readme_step_seconds']:.2f} s vs the baseline's {timing['baseline_step_seconds']:.2f} s")
                  + f"; down-projections {'refit' if refit else 'as cut'}.")
        grouped_bars({c: {d: v[d]["ppl"] for d in domains} for c, v in cols.items()}, ex.path("ppl.png"),
                     title="equal-size dense baseline vs Read-ME", ylabel="held-out perplexity", log=True)
        result = {"params": model.num_params(), "ffn_width": int(model.config.intermediate_size),
                  "steps": sum(p.steps for p in schedule), "wall_time": timing, "refit": refit,
                  "ppl": {c: v for c, v in cols.items()}, "readme_wins": wins, "domains": len(domains)}
        ex.finish(result, table)
        return result
