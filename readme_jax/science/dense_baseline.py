"""The equal-size dense baseline (paper Table 5): the dense parent with every FFN pruned to one expert's width.

Channels: per layer the ``Fe = masks.expert_dim`` (= round(keep_ratio * F)) channels of highest calibration
score over all domains together (the token-weighted mean of the per-domain scores of stage 'stats', the
statistic the experts were cut by), so the model has exactly Read-ME's active parameter count. Tuning: the
LM loss over the same schedule as Read-ME's expert phases (their steps, batch, per-round peak lr and cosine,
data seeds and domain mixture, so the same sequences in the same order), all parameters trainable, AdamW with
the run's weight decay and clipping. Resumable per round (``round_<r>/`` checkpoints).

    python -m readme_jax.science dense_baseline --run-dir runs/default
"""

from __future__ import annotations

import dataclasses
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
from readme_jax.train.losses import lm_loss
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


def tune_lm(model: nnx.Module, run: Run, schedule: list, *, log, progress: bool = True) -> None:
    """LM-loss tuning of every param of ``model`` (in place) over ``schedule`` (expert Phases: steps, batch,
    peak lr, seed), with the run's data stream, mixture, optimizer settings and mesh."""
    from readme_jax.data.pipeline import mixed_dataset
    from readme_jax.parallel.mesh import replicated, shard_batch
    from readme_jax.parallel.sharding import place
    t = run.cfg.train
    mesh = train_mesh(run.cfg)
    graphdef, trainable = nnx.split(model, nnx.Param)

    def loss_fn(tr, frozen, mb):
        nll = nnx.merge(graphdef, tr).token_nll(mb["input_ids"], mb["targets"])
        loss, _ = lm_loss(nll, mb["loss_mask"])
        return loss, {}

    weights = None if t.mixture == "natural" else [1.0] * len(run.corpus.domains)
    for phase in schedule:
        tx = make_optimizer(1.0, phase.steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
        sh = steps_lib.StepShardings.of(trainable, nnx.State({}), tx, mesh)
        step = steps_lib.TrainStep(loss_fn, tx, sh)
        trainable = place(trainable, sh.trainable)
        opt_state = sh.init_opt_state(tx, trainable)
        peak = place(jnp.asarray(phase.peak_lr, jnp.float32), replicated(mesh))
        it = iter(mixed_dataset(run.corpus, run.tokenizer, t.seq_len, phase.batch, phase.seed, split="train",
                                weights=weights))
        for i in tqdm(range(phase.steps), desc=f"dense baseline {phase.name}", disable=not progress):
            b = next(it)
            micro = {k: steps_lib.microbatches(b[k], t.grad_accum) for k in ("input_ids", "targets", "loss_mask")}
            t0 = time.perf_counter()
            trainable, opt_state, metrics = step(trainable, opt_state, nnx.State({}), shard_batch(micro, mesh, axis=1),
                                                 peak)
            host = steps_lib.check_finite(metrics, phase=f"dense baseline {phase.name}", step=i + 1)
            log({"phase": phase.name, "step": i + 1, "loss": float(host["loss"]),
                 "seconds": round(time.perf_counter() - t0, 3)})
    nnx.update(model, trainable)


@dataclasses.dataclass(frozen=True)
class DenseBaselineSettings:
    """The equal-size dense model: the parent's FFN pruned to one expert's width by the statistics of all
    domains together, tuned with Read-ME's expert-tuning schedule (rounds x expert_steps x expert_batch
    sequences, lr x decay per round, same data order) unless these override it."""
    expert_lr: float | None = None       # null: the parent run's train.expert_lr


@EXPERIMENTS.register("dense_baseline", DenseBaselineSettings)
def dense_baseline(parent: Run, settings, *, progress: bool = True) -> dict:
    """Prune, tune, evaluate; the table compares held-out perplexity per domain with the dense parent and
    Read-ME (router_0 and final) of the parent run."""
    from readme_jax.convert.checkpoint import save_checkpoint
    from readme_jax.convert.load import load_pretrained
    from readme_jax.eval.perplexity import evaluate_perplexity
    run = parent
    lr = settings.expert_lr if settings.expert_lr is not None else run.cfg.train.expert_lr
    schedule = [dataclasses.replace(p, peak_lr=p.peak_lr * lr / run.cfg.train.expert_lr)
                for p in phases(run.cfg) if p.kind == "expert"]
    domains = list(run.corpus.domains)
    with Experiment(run, "dense_baseline", {"expert_lr": lr, "schedule": [dataclasses.asdict(p) for p in schedule]}) as ex:
        model_dir = ex.path("model")
        if (model_dir / "config.json").is_file():
            model, _ = load_pretrained(model_dir, dtype=None)
        else:
            if not run.scores_path.is_file():
                raise PipelineError(f"{run.scores_path}: missing; the parent run has no statistics")
            with np.load(run.scores_path) as z:
                scores, tokens = z["scores"], z["tokens"]
            width = run.masks.expert_dim
            channels = kept_channels(pooled_scores(scores, tokens), width)
            model = prune_ffn(run.dense, channels)
            say(f"[dense_baseline] FFN {run.dense.config.intermediate_size} -> {width} channels per layer; "
                f"{model.num_params():,} params; tuning {sum(p.steps for p in schedule)} steps x "
                f"{schedule[0].batch} x {run.cfg.train.seq_len} tokens")
            losses = []
            tune_lm(model, run, schedule, log=losses.append, progress=progress)
            save_checkpoint(model_dir, model, tokenizer=run.tokenizer, kind="dense", overwrite=True)
            ex.part("losses", lambda: losses)
        ppl = ex.part("ppl", lambda: evaluate_perplexity(
            model, run.tokenizer, run.corpus, seq_len=run.cfg.eval.seq_len, max_tokens=run.cfg.eval.max_tokens,
            batch_size=run.cfg.eval.batch, progress=progress))
        evals = {t: json.loads(run.eval_path(t).read_text())["ppl"] for t in ("dense", "router_0", "final")}
        cols = {"dense parent": evals["dense"], "equal-size dense (tuned)": ppl,
                "Read-ME, no tuning": evals["router_0"], "Read-ME (tuned)": evals["final"]}
        rows = [[d, *[cols[c][d]["ppl"] for c in cols],
                 "yes" if evals["final"][d]["ppl"] < ppl[d]["ppl"] else "no"] for d in domains]
        wins = sum(r[-1] == "yes" for r in rows)
        table = markdown_table(["domain", *cols, "Read-ME below equal-size dense"], rows)
        table += (f"\n\nRead-ME below the equal-size dense baseline in {wins} of {len(domains)} domains (paper: 7 of 7). "
                  f"Active params: equal-size dense {model.num_params():,}; same tuning tokens "
                  f"({sum(p.steps * p.batch for p in schedule) * run.cfg.train.seq_len:,}).")
        grouped_bars({c: {d: v[d]["ppl"] for d in domains} for c, v in cols.items()}, ex.path("ppl.png"),
                     title="equal-size dense baseline vs Read-ME", ylabel="held-out perplexity", log=True)
        result = {"params": model.num_params(), "ffn_width": int(model.config.intermediate_size),
                  "ppl": {c: v for c, v in cols.items()}, "readme_wins": wins, "domains": len(domains)}
        ex.finish(result, table)
        return result
