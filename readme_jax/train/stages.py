"""The stages of the Read-ME pipeline, as one table (:data:`STAGES`).

Each :class:`Stage` names its function, the outputs that mark it done, the config keys its outputs depend
on, and the earlier stages whose outputs it reads. A stage is skipped when it is done (by default: every
output exists); a change to one of its ``keys`` invalidates it and, through ``needs``, every stage that reads
it. A key is ``"section"`` (every key of that config section) or ``"section.key"``. The pipeline records
the values of each stage's keys when it runs (:mod:`readme_jax.train.records`): a changed key of an
``evaluation`` stage re-runs it from the saved checkpoints; of any other stage, the run is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.atomic import atomic_dir, atomic_file, atomic_write_json
from readme_jax.errors import PipelineError
from readme_jax.eval.routing import route_windows, routing_metrics
from readme_jax.train import targets as targets_lib
from readme_jax.train.run import Run, say
from readme_jax.train.trainer import phases


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    name: the ``--stage`` name; fn: ``fn(run)`` runs the stage; outputs: ``outputs(run)``, the paths that
    mark it done; keys: the config keys its outputs depend on; needs: the stages whose outputs it reads;
    done: ``done(run)``, when being done is more than every output existing (None: they all exist);
    evaluation: its outputs are measurements of earlier outputs, so a change to its keys re-runs it (never
    refused).
    """
    name: str
    fn: Callable[[Run], None]
    outputs: Callable[[Run], list[Path]]
    keys: tuple[str, ...]
    needs: tuple[str, ...] = ()
    done: Callable[[Run], bool] | None = None
    evaluation: bool = False

    def is_done(self, run: Run) -> bool:
        if self.done is not None:
            return self.done(run)
        return all(p.exists() for p in self.outputs(run))


# ------------------------------------------------------------------------------------- evaluations
def heldout_perplexity(run: Run, model) -> dict:
    from readme_jax.eval.perplexity import evaluate_perplexity
    ev = run.cfg.eval
    return evaluate_perplexity(model, run.tokenizer, run.corpus, seq_len=ev.seq_len, max_tokens=ev.max_tokens,
                               batch_size=ev.batch, progress=run.progress)


def heldout_routing(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{domain: (held-out routing windows int32[W, T], dense parent's target expert int32[W, T])}, the
    windows capped at eval.routing_tokens per domain (cached by :func:`readme_jax.train.targets.heldout_routing`)."""
    from readme_jax.eval.perplexity import heldout_windows
    ev = run.cfg.eval
    windows = {d: heldout_windows(run.corpus, d, run.tokenizer, seq_len=ev.seq_len,
                                  max_tokens=min(ev.routing_tokens, ev.max_tokens))[0]
               for d in run.corpus.domains}
    return targets_lib.heldout_routing(run.heldout_routing_path, windows, run.dense, run.masks.specific,
                                       batch=ev.batch, use_abs=run.cfg.train.target_abs)


def moe_metrics(run: Run, model) -> dict:
    """Perplexity per domain, plus the routing metrics of :func:`readme_jax.eval.routing.routing_metrics` on
    the same held-out windows (only the router runs; the targets are cached)."""
    out = {"ppl": heldout_perplexity(run, model)}
    routed = {d: (route_windows(model.router, inputs, batch=run.cfg.eval.batch), target)
              for d, (inputs, target) in heldout_routing(run).items()}
    out.update(routing_metrics(routed, num_experts=run.masks.num_experts))
    return out


def record_eval(run: Run, tag: str, result: dict) -> None:
    """Write ``eval/<tag>.json`` and its metrics record (replacing an older one of that tag)."""
    record = {"event": "eval", "tag": tag, **result}
    run.log.drop(lambda r: r.get("event") == "eval" and r.get("tag") == tag)
    run.log.write(record)
    atomic_write_json(run.eval_path(tag), record, indent=1)
    ppl = ", ".join(f"{d} {v['ppl']:.3f}" for d, v in result["ppl"].items())
    extra = "" if "router_accuracy" not in result else (
        f"; router accuracy {result['router_accuracy']:.3f}, locality {result['locality']:.3f}")
    say(f"[eval {tag}] ppl: {ppl}{extra}")


# ------------------------------------------------------------------------------------------ stages
def stage_dense(run: Run) -> None:
    """model.source 'random-tiny': synthetic texts (or corpus.from_dir) -> BPE tokenizer -> random Llama."""
    from readme_jax.convert.checkpoint import save_checkpoint
    from readme_jax.model.llama import Llama
    from readme_jax.train import synthetic

    cfg = run.cfg
    rnd = cfg.model.random
    if cfg.corpus.synthetic:
        texts = synthetic.write_texts(run.texts_dir, seed=cfg.corpus.seed)
    elif cfg.corpus.from_dir:
        texts = Path(cfg.corpus.from_dir)
    else:
        raise PipelineError("model.source 'random-tiny' trains its tokenizer on the corpus texts: set "
                            "corpus.synthetic=true or corpus.from_dir")
    tok = synthetic.train_tokenizer(texts, run.tokenizer_dir, vocab_size=rnd.vocab_size)
    lcfg = rnd.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, dtype=cfg.model.dtype, param_dtype=cfg.model.dtype)
    model = Llama(lcfg, rngs=nnx.Rngs(cfg.train.seed))
    save_checkpoint(run.dense_dir, model, tokenizer=tok, kind="dense", overwrite=True)
    say(f"[dense] random Llama {model.num_params():,} params -> {run.dense_dir}")


def stage_corpus(run: Run) -> None:
    """Build the per-domain corpus into the run folder, or verify corpus.dir against its manifest."""
    from readme_jax.data.corpus import build_corpus, skipped_note, verify_corpus
    c = run.cfg.corpus
    if c.dir:
        problems = verify_corpus(c.dir)
        if problems:
            raise PipelineError(f"corpus {c.dir} does not match its manifest: " + "; ".join(problems[:5]))
        return
    from_dir = run.texts_dir if c.synthetic else c.from_dir
    if c.synthetic and not run.texts_dir.is_dir():
        from readme_jax.train import synthetic
        synthetic.write_texts(run.texts_dir, seed=c.seed)
    manifest = build_corpus(run.corpus_dir, run.tokenizer, c.domains, seed=c.seed, from_dir=from_dir,
                            heldout_fraction=c.heldout_fraction, min_heldout_chars=c.min_heldout_chars)
    run.cfg.check_domains(list(manifest["domains"]))
    note = skipped_note(manifest)
    if note:
        say(f"[corpus] {note}")
    rows = [f"{d}: train {e['splits']['train']['tokens']:,} / heldout {e['splits']['heldout']['tokens']:,} tokens"
            for d, e in manifest["domains"].items()]
    say("[corpus] " + "; ".join(rows))


def stage_dense_eval(run: Run) -> None:
    record_eval(run, "dense", {"ppl": heldout_perplexity(run, run.dense)})


def _train_sequences(run: Run, domain: str, seq_len: int, count: int, what: str, fix: str):
    """(packer of ``domain``'s train split into ``seq_len``-token sequences, how many it holds); a clear
    error when fewer than ``count``."""
    from readme_jax.data.pipeline import PackedSequence, domain_tokens, num_sequences
    tokens = domain_tokens(run.corpus, domain, "train", run.tokenizer)
    have = num_sequences(len(tokens), seq_len)
    if have < count:
        raise PipelineError(
            f"domain {domain!r}: {run.corpus.path(domain, 'train')} holds {len(tokens):,} tokens = {have} {what} "
            f"of {seq_len}; {fix}")
    return PackedSequence(tokens, seq_len, run.tokenizer.bos_id), have


def calibration_batches(run: Run) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The statistics pass's input: ({domain: batches of extract.calib_batch sequences, each {"input_ids",
    "loss_mask"} <int32>[b, calib_seq_len]}, {domain: calibration tokens}): the first extract.calib_seqs
    sequences of each domain's train split."""
    e = run.cfg.extract
    batches, counts = {}, {}
    for d in run.corpus.domains:
        pack, _ = _train_sequences(
            run, d, e.calib_seq_len, e.calib_seqs, "calibration sequences",
            f"extract.calib_seqs={e.calib_seqs} x calib_seq_len={e.calib_seq_len} needs "
            f"{e.calib_seqs * e.calib_seq_len + 1:,}. Lower extract.calib_seqs / extract.calib_seq_len or add "
            f"text to that domain.")
        seqs = [pack(i) for i in range(e.calib_seqs)]
        batches[d] = [{k: np.stack([s[k] for s in seqs[i:i + e.calib_batch]]) for k in ("input_ids", "loss_mask")}
                      for i in range(0, e.calib_seqs, e.calib_batch)]
        counts[d] = e.calib_seqs * e.calib_seq_len
    return batches, counts


def stage_stats(run: Run) -> None:
    """Calibration statistics: mean |down_proj input| per domain, layer and channel of the dense parent."""
    from readme_jax.extract.stats import domain_statistics
    e = run.cfg.extract
    batches, counts = calibration_batches(run)
    t0 = time.time()
    domains, scores, grams = domain_statistics(run.dense, batches, progress=run.progress, gram=e.refit)
    if grams is not None:
        with atomic_file(run.grams_path, suffix=".npy") as tmp:
            np.save(tmp, grams)
    with atomic_file(run.scores_path, suffix=".npz") as tmp:
        np.savez(tmp, scores=scores, domains=np.asarray(domains, str), tokens=np.asarray([counts[d] for d in domains]))
    run.log.write({"event": "stats", "domains": domains, "tokens_per_domain": counts,
                   "seconds": round(time.time() - t0, 1)})
    say(f"[stats] {len(domains)} domains x {e.calib_seqs * e.calib_seq_len:,} tokens ({time.time() - t0:.1f} s)")


def stage_extract(run: Run) -> None:
    """Expert masks from the statistics (+ sizes, active / total parameter counts in report.json)."""
    from readme_jax.extract.masks import build_masks
    if not run.scores_path.is_file():
        raise PipelineError(f"{run.scores_path}: missing; run stage 'stats' first")
    with np.load(run.scores_path) as z:
        scores, domains = z["scores"], [str(d) for d in z["domains"]]
    run.cfg.check_domains(domains)
    masks = build_masks(scores, run.cfg.extract.keep_ratio, domains=domains)
    masks.save(run.masks_path)
    run.forget("masks")
    report = masks.report(run.dense.config, router_params=run.router_config().num_params())
    atomic_write_json(run.report_path, report, indent=1)
    run.log.write({"event": "extract", **{k: report[k] for k in ("shared", "expert_dim", "summary") if k in report}})
    say(f"[extract] E={masks.num_experts}, Fe={masks.expert_dim} of F={masks.ffn_dim}; shared channels per "
        f"layer {report['shared']}; Read-ME {report.get('summary', '')} (active-total) vs dense "
        f"{report.get('dense_params', 0):,}")


def stage_targets(run: Run) -> None:
    """The router pool: ``train.router_pool_seqs`` sequences of ``train.seq_len`` per domain from the train
    split (chosen by ``default_rng([train.seed, domain index])``) and the dense parent's distillation targets
    of each (:func:`readme_jax.train.targets.build_router_pool`); then the held-out routing targets."""
    t = run.cfg.train
    seqs, doms = [], []
    for di, d in enumerate(run.corpus.domains):
        pack, have = _train_sequences(
            run, d, t.seq_len, t.router_pool_seqs, "sequences",
            f"train.router_pool_seqs={t.router_pool_seqs} needs {t.router_pool_seqs * t.seq_len + 1:,}. "
            f"Lower train.router_pool_seqs or add text.")
        pick = np.sort(np.random.default_rng([t.seed, di]).choice(have, t.router_pool_seqs, replace=False))
        seqs += [pack(int(i)) for i in pick]
        doms += [di] * len(pick)
    t0 = time.time()
    pool = targets_lib.build_router_pool(run.dense, run.masks.specific, seqs, np.asarray(doms),
                                         batch=run.cfg.extract.calib_batch, dtype=t.dtype, use_abs=t.target_abs,
                                         progress=run.progress)
    pool.save(run.router_targets_path, list(run.corpus.domains))
    run.forget("router_pool")
    run.log.write({"event": "targets", "sequences": len(pool), "tokens": int(pool.input_ids.size),
                   "seconds": round(time.time() - t0, 1)})
    say(f"[targets] {len(pool)} sequences x {t.seq_len} tokens, dist {tuple(pool.dist.shape)} "
        f"({pool.dist.nbytes / 2**20:.1f} MiB, {time.time() - t0:.1f} s) -> {run.router_targets_path}")


def stage_rounds(run: Run) -> None:
    """router_r, expert_r for r < train.rounds (each resumable mid-round)."""
    model = run.fresh_model()
    trainer = run.trainer(model, run.router_pool)
    for phase in phases(run.cfg):
        if trainer.is_done(phase):
            trainer.load_done(phase)
        else:
            t0 = time.time()
            trainer.run(phase)
            say(f"[{phase.name}] done in {time.time() - t0:.1f} s")
    run.set_trained_model(model.untied())


def round_eval_phases(run: Run) -> list:
    """The phases evaluated on their own: router_0 (the MoE before any expert tuning) and, with
    eval.each_round, every expert round but the last (the last is stage 'final_eval')."""
    last = run.cfg.train.rounds - 1
    return [p for p in phases(run.cfg)
            if p.name == "router_0" or (p.kind == "expert" and run.cfg.eval.each_round and p.round != last)]


def stage_round_evals(run: Run) -> None:
    """The MoE after each phase of :func:`round_eval_phases`, rebuilt from the extracted experts and the
    phases' saved checkpoints (evaluations missing from ``eval/`` only)."""
    for phase in round_eval_phases(run):
        if not run.eval_path(phase.name).exists():
            record_eval(run, phase.name, moe_metrics(run, run.model_after(phase)))


def stage_final_eval(run: Run) -> None:
    record_eval(run, "final", moe_metrics(run, run.trained_model()))   # run_pipeline prints the table


def stage_export(run: Run) -> None:
    """Write the Read-ME checkpoint beside ``export/`` (experts as trained: tied tables when tied, which the
    serving runner's masked kernel reads), reload it with ``load_pretrained``, compare logits on a held-out
    batch, then rename it into place (a failed check leaves ``export/`` as it was)."""
    from readme_jax.convert.load import load_pretrained
    from readme_jax.eval.perplexity import heldout_windows
    from readme_jax.convert.readme_checkpoint import save_readme
    model = run.model_after(phases(run.cfg)[-1], fused=False)
    ev = run.cfg.eval
    ids, _ = heldout_windows(run.corpus, run.corpus.domains[0], run.tokenizer, seq_len=ev.seq_len,
                             max_tokens=ev.seq_len * ev.batch)
    ids = jnp.asarray(ids)
    with atomic_dir(run.export_dir, overwrite=True) as tmp:
        save_readme(model, tmp, run.tokenizer, overwrite=True)
        back, tok = load_pretrained(tmp, dtype=None)
        err = float(jnp.max(jnp.abs(back(ids) - model(ids))))
        if not err <= 1e-5 or tok is None:
            raise PipelineError(f"{run.export_dir}: the exported checkpoint does not reload to the same model "
                                f"(max |logit diff| {err}, tokenizer {'missing' if tok is None else 'ok'})")
    say(f"[export] {run.export_dir} (reloaded: logits match, max |diff| {err:.1e})")


def stage_plots(run: Run) -> None:
    from readme_jax.train.plots import make_plots
    paths = make_plots(run.dir)
    say(f"[plots] {', '.join(str(p) for p in paths)}")


# ------------------------------------------------------------------------------------------- table
_EVAL_WINDOWS = ("eval.seq_len", "eval.max_tokens", "eval.batch")
_MOE_EVAL = (*_EVAL_WINDOWS, "eval.routing_tokens")

STAGES: tuple[Stage, ...] = (
    Stage("dense", stage_dense, lambda r: [r.dense_dir / "config.json"],
          keys=("model", "corpus.synthetic", "corpus.from_dir", "corpus.seed", "train.seed"),
          done=lambda r: r.cfg.model.source != "random-tiny" or (r.dense_dir / "config.json").is_file()),
    Stage("corpus", stage_corpus, lambda r: [r.corpus_dir / "manifest.json"], keys=("corpus",), needs=("dense",),
          done=lambda r: not r.cfg.corpus.dir and (r.corpus_dir / "manifest.json").is_file()),
    Stage("dense_eval", stage_dense_eval, lambda r: [r.eval_path("dense")], keys=_EVAL_WINDOWS,
          needs=("dense", "corpus"), evaluation=True),
    # extract.refit adds the Gram matrices to the outputs (stage 'stats' then reruns; its scores are the same)
    Stage("stats", stage_stats, lambda r: [r.scores_path] + ([r.grams_path] if r.cfg.extract.refit else []),
          keys=("extract.calib_seqs", "extract.calib_seq_len", "extract.calib_batch"), needs=("dense", "corpus")),
    Stage("extract", stage_extract, lambda r: [r.masks_path, r.report_path],
          keys=("extract.keep_ratio", "extract.num_experts", "router"), needs=("dense", "stats")),
    Stage("targets", stage_targets, lambda r: [r.router_targets_path],
          keys=("train.router_pool_seqs", "train.seq_len", "train.seed", "train.dtype", "train.target_abs",
                "extract.calib_batch"),
          needs=("dense", "corpus", "extract")),
    Stage("rounds", stage_rounds, lambda r: [r.phase_dir(p) for p in phases(r.cfg)],
          keys=("router", "train", "extract.refit", "extract.refit_ridge"), needs=("dense", "corpus", "extract", "targets"),
          done=lambda r: r.phases_done()),
    Stage("round_evals", stage_round_evals, lambda r: [r.eval_path(p.name) for p in round_eval_phases(r)],
          keys=_MOE_EVAL + ("eval.each_round",), needs=("corpus", "extract", "rounds"), evaluation=True),
    Stage("final_eval", stage_final_eval, lambda r: [r.eval_path("final")], keys=_MOE_EVAL,
          needs=("corpus", "extract", "rounds"), evaluation=True),
    # the logits check of the export runs on eval.seq_len x eval.batch tokens, but the export is the same
    Stage("export", stage_export, lambda r: [r.export_dir / "config.json"], keys=(), needs=("corpus", "rounds")),
    Stage("plots", stage_plots, lambda r: [r.plots_dir / f"{n}.png" for n in ("loss", "perplexity", "load")],
          keys=(), needs=("dense_eval", "rounds", "round_evals", "final_eval"), done=lambda r: False,
          evaluation=True),   # cheap: always redrawn
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
