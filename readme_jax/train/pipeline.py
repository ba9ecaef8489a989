"""The Read-ME pipeline behind ``python -m readme_jax.train``: stages, each skipped when its output exists.

    dense       the dense parent (random-tiny: synthetic texts + BPE + random Llama -> <run>/dense/)
    corpus      build (or verify) the per-domain corpus                      -> <run>/corpus/manifest.json
    dense_eval  held-out perplexity of the dense parent                      -> <run>/eval/dense.json
    stats       calibration statistics, mean |down_proj input| per domain    -> <run>/extract/scores.npz
    extract     expert masks (+ sizes, active / total parameter counts)      -> <run>/extract/masks.npz
    targets     the router pool: train.router_pool_seqs train sequences per  -> <run>/extract/router_targets.npz
                domain + the dense parent's distillation targets (one pass);
                + argmax targets of the held-out routing windows             -> <run>/extract/heldout_routing.npz
    rounds      router_r, expert_r for r < train.rounds (resumable mid-round) -> <run>/checkpoints/<phase>/
                (+ <run>/eval/router_0.json: the MoE after the first router round, before any expert tuning)
    final_eval  perplexity, router accuracy, locality, expert load           -> <run>/eval/final.json
    export      a Read-ME checkpoint ``readme_jax.load_pretrained`` reads     -> <run>/export/
    plots       loss per round, perplexity per domain per round, expert load -> <run>/plots/*.png

Router targets come from the frozen dense *parent*. With the fused layout the shared channels are copied
into every expert and drift apart during expert tuning, so after round 0 there is no single "dense model"
inside the MoE any more; the parent is the only well-defined teacher, and it is the one the targets of
every round are computed from. Since the parent never changes, a sequence's targets never change either:
the ``targets`` stage runs the parent once over a fixed pool of train sequences, and every router round
samples batches (sequence + stored targets) from that pool, running only the router. The held-out
routing targets of the evaluations are cached the same way, so an evaluation runs only the MoE.

The run folder also holds ``config.yaml`` (the resolved config; a rerun with different model / corpus /
extract / router / train settings is refused, since it could not resume) and ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.config import Config, ConfigError
from readme_jax.train.losses import router_targets, routing_locality
from readme_jax.train.trainer import MetricsLog, Trainer, phases

STAGES = ("dense", "corpus", "dense_eval", "stats", "extract", "targets", "rounds", "final_eval", "export", "plots")
RESUME_SECTIONS = ("model", "corpus", "extract", "router", "train")   # must match to reuse a run folder


class PipelineError(RuntimeError):
    """A stage cannot run (missing input, bad data); the message says what and where."""


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


class Run:
    """One run folder and the objects its stages share (loaded lazily, once)."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, Path(run_dir), progress
        self.log = MetricsLog(self.dir / "metrics.jsonl", enabled=jax.process_index() == 0)
        self._model = None

    # ------------------------------------------------------------------------------------ paths
    @property
    def dense_dir(self) -> Path:
        return self.dir / "dense"

    @property
    def texts_dir(self) -> Path:
        return self.dir / "texts"

    @property
    def corpus_dir(self) -> Path:
        return Path(self.cfg.corpus.dir) if self.cfg.corpus.dir else self.dir / "corpus"

    def eval_path(self, tag: str) -> Path:
        return self.dir / "eval" / f"{tag}.json"

    @property
    def scores_path(self) -> Path:
        return self.dir / "extract" / "scores.npz"

    @property
    def masks_path(self) -> Path:
        return self.dir / "extract" / "masks.npz"

    @property
    def router_targets_path(self) -> Path:
        return self.dir / "extract" / "router_targets.npz"

    @property
    def heldout_routing_path(self) -> Path:
        return self.dir / "extract" / "heldout_routing.npz"

    @property
    def export_dir(self) -> Path:
        return self.dir / "export"

    # ------------------------------------------------------------------------------- config file
    def write_config(self) -> None:
        path = self.dir / "config.yaml"
        new = self.cfg.to_dict()
        if path.exists():
            old = yaml.safe_load(path.read_text()) or {}
            diff = [f"{s}" for s in RESUME_SECTIONS if old.get(s) != new.get(s)]
            if diff:
                raise PipelineError(f"{path}: this run folder was made with different {diff} settings; "
                                    "resuming would mix two runs. Use another --run-dir, or delete the folder.")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(self.cfg.to_yaml())
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------ shared objects
    def dense_source(self) -> Path:
        src = self.cfg.model.source
        if src == "random-tiny":
            if not (self.dense_dir / "config.json").is_file():
                raise PipelineError(f"{self.dense_dir}: missing; run stage 'dense' first")
            return self.dense_dir
        if src == "smollm2":
            from readme_jax import assets
            return assets.smollm2_gguf()
        return Path(src)

    @functools.cached_property
    def _dense_and_tokenizer(self):
        from readme_jax.convert.load import load_pretrained
        src = self.dense_source()
        t0 = time.time()
        model, tok = load_pretrained(src, dtype=jnp.dtype(self.cfg.model.dtype))
        if tok is None:
            raise PipelineError(f"{src}: the model source has no tokenizer")
        _say(f"[dense] {src}: {model.num_params():,} params, vocab {model.config.vocab_size} "
             f"({time.time() - t0:.1f} s)")
        return model, tok

    @property
    def dense(self):
        return self._dense_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self._dense_and_tokenizer[1]

    @functools.cached_property
    def corpus(self):
        from readme_jax.data.corpus import load_corpus
        corpus = load_corpus(self.corpus_dir)
        self.cfg.check_domains(corpus.domains)
        return corpus

    @functools.cached_property
    def masks(self):
        from readme_jax.extract.masks import ExpertMasks
        if not self.masks_path.is_file():
            raise PipelineError(f"{self.masks_path}: missing; run stage 'extract' first")
        return ExpertMasks.load(self.masks_path)

    @functools.cached_property
    def router_pool(self):
        """The :class:`~readme_jax.train.trainer.RouterPool` of stage 'targets' (checked against the config)."""
        from readme_jax.train.trainer import RouterPool
        path = self.router_targets_path
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run stage 'targets' first")
        with np.load(path) as z:
            pool = RouterPool(input_ids=z["input_ids"], loss_mask=z["loss_mask"], dist=z["dist"].astype(np.float32),
                              domain=z["domain"])
        t = self.cfg.train
        n = t.router_pool_seqs * len(self.corpus.domains)
        want = (n, self.dense.config.num_layers, t.seq_len, self.masks.num_experts)
        if pool.dist.shape != want or pool.input_ids.shape != (n, t.seq_len):
            raise PipelineError(f"{path}: dist {pool.dist.shape} / input_ids {pool.input_ids.shape} do not match "
                                f"the config (dist {want}); delete it and rerun stage 'targets'")
        return pool

    def router_config(self):
        from readme_jax.model.router import RouterConfig
        try:
            return RouterConfig(vocab_size=self.dense.config.vocab_size, num_experts=self.masks.num_experts,
                                **dict(self.cfg.router))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"router: {e}") from None

    def fresh_model(self):
        """The extracted Read-ME model before any tuning (deterministic in train.seed)."""
        from readme_jax.extract.experts import readme_from_dense
        return readme_from_dense(self.dense, self.masks, self.router_config(), rngs=nnx.Rngs(self.cfg.train.seed))

    def trainer(self, model, pool=None) -> Trainer:
        return Trainer(self.cfg, self.dir, model, pool, self.masks.specific, self.corpus, self.tokenizer,
                       self.log, progress=self.progress)

    def trained_model(self):
        """The model after the last round (every phase must be done)."""
        if self._model is not None:
            return self._model
        model = self.fresh_model()
        trainer = self.trainer(model)
        sched = phases(self.cfg)
        missing = [p.name for p in sched if not trainer.is_done(p)]
        if missing:
            raise PipelineError(f"{self.dir}/checkpoints: phases {missing} are not finished; run stage 'rounds'")
        last = {p.kind: p for p in sched}
        for p in last.values():
            trainer.load_done(p)
        self._model = model
        return model

    # ------------------------------------------------------------------------------------ stages
    def stage_dense(self) -> None:
        if self.cfg.model.source != "random-tiny":
            _ = self.dense      # load once: fails early on a bad source
            return
        from readme_jax.convert.checkpoint import save_checkpoint
        from readme_jax.model.config import LlamaConfig
        from readme_jax.model.llama import Llama
        from readme_jax.train import synthetic

        rnd = dict(self.cfg.model.random)
        vocab = int(rnd.pop("vocab_size", 512))
        if self.cfg.corpus.synthetic:
            texts = synthetic.write_texts(self.texts_dir, seed=self.cfg.corpus.seed)
        elif self.cfg.corpus.from_dir:
            texts = Path(self.cfg.corpus.from_dir)
        else:
            raise PipelineError("model.source 'random-tiny' trains its tokenizer on the corpus texts: set "
                                "corpus.synthetic=true or corpus.from_dir")
        tok = synthetic.train_tokenizer(texts, self.dir / "tokenizer", vocab_size=vocab)
        try:
            cfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id, dtype=self.cfg.model.dtype,
                              param_dtype=self.cfg.model.dtype, **rnd)
        except TypeError as e:
            raise ConfigError(f"model.random: {e}") from None
        model = Llama(cfg, rngs=nnx.Rngs(self.cfg.train.seed))
        save_checkpoint(self.dense_dir, model, tokenizer=tok, kind="dense", overwrite=True)
        _say(f"[dense] random Llama {model.num_params():,} params -> {self.dense_dir}")

    def stage_corpus(self) -> None:
        from readme_jax.data.corpus import build_corpus, verify_corpus
        c = self.cfg.corpus
        if c.dir:
            problems = verify_corpus(c.dir)
            if problems:
                raise PipelineError(f"corpus {c.dir} does not match its manifest: " + "; ".join(problems[:5]))
            return
        from_dir = self.texts_dir if c.synthetic else c.from_dir
        if c.synthetic and not self.texts_dir.is_dir():
            from readme_jax.train import synthetic
            synthetic.write_texts(self.texts_dir, seed=c.seed)
        manifest = build_corpus(self.corpus_dir, self.tokenizer, c.domains, seed=c.seed, from_dir=from_dir,
                                heldout_fraction=c.heldout_fraction, min_heldout_chars=c.min_heldout_chars)
        self.cfg.check_domains(list(manifest["domains"]))
        rows = [f"{d}: train {e['splits']['train']['tokens']:,} / heldout {e['splits']['heldout']['tokens']:,} tokens"
                for d, e in manifest["domains"].items()]
        _say("[corpus] " + "; ".join(rows))

    def stage_dense_eval(self) -> None:
        res = self._perplexity(self.dense)
        self._record_eval("dense", {"ppl": res})

    def stage_stats(self) -> None:
        from readme_jax.data.pipeline import PackedSequence, domain_tokens, num_sequences
        from readme_jax.extract.stats import domain_scores
        e = self.cfg.extract
        batches, counts = {}, {}
        for d in self.corpus.domains:
            tokens = domain_tokens(self.corpus, d, "train", self.tokenizer)
            have = num_sequences(len(tokens), e.calib_seq_len)
            if have < e.calib_seqs:
                raise PipelineError(
                    f"domain {d!r}: {self.corpus.path(d, 'train')} holds {len(tokens):,} tokens = {have} calibration "
                    f"sequences of {e.calib_seq_len}; extract.calib_seqs={e.calib_seqs} x calib_seq_len="
                    f"{e.calib_seq_len} needs {e.calib_seqs * e.calib_seq_len + 1:,}. Lower extract.calib_seqs / "
                    f"extract.calib_seq_len or add text to that domain.")
            pack = PackedSequence(tokens, e.calib_seq_len, self.tokenizer.bos_id)
            seqs = [pack(i) for i in range(e.calib_seqs)]
            batches[d] = [{k: np.stack([s[k] for s in seqs[i:i + e.calib_batch]]) for k in ("input_ids", "loss_mask")}
                          for i in range(0, e.calib_seqs, e.calib_batch)]
            counts[d] = e.calib_seqs * e.calib_seq_len
        t0 = time.time()
        domains, scores = domain_scores(self.dense, batches, progress=self.progress)
        self.scores_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.scores_path.with_suffix(".tmp.npz")
        np.savez(tmp, scores=scores, domains=np.asarray(domains, str), tokens=np.asarray([counts[d] for d in domains]))
        os.replace(tmp, self.scores_path)
        self.log.write({"event": "stats", "domains": domains, "tokens_per_domain": counts,
                        "seconds": round(time.time() - t0, 1)})
        _say(f"[stats] {len(domains)} domains x {e.calib_seqs * e.calib_seq_len:,} tokens ({time.time() - t0:.1f} s)")

    def stage_extract(self) -> None:
        from readme_jax.extract.masks import build_masks
        if not self.scores_path.is_file():
            raise PipelineError(f"{self.scores_path}: missing; run stage 'stats' first")
        with np.load(self.scores_path) as z:
            scores, domains = z["scores"], [str(d) for d in z["domains"]]
        self.cfg.check_domains(domains)
        masks = build_masks(scores, self.cfg.extract.keep_ratio, domains=domains)
        masks.save(self.masks_path)
        self.__dict__.pop("masks", None)
        report = masks.report(self.dense.config, router_params=self.router_config().num_params())
        _write_json(self.dir / "extract" / "report.json", report)
        self.log.write({"event": "extract", **{k: report[k] for k in ("shared", "expert_dim", "summary")
                                                if k in report}})
        _say(f"[extract] E={masks.num_experts}, Fe={masks.expert_dim} of F={masks.ffn_dim}; shared channels per "
             f"layer {report['shared']}; Read-ME {report.get('summary', '')} (active-total) vs dense "
             f"{report.get('dense_params', 0):,}")

    def stage_targets(self) -> None:
        """The router pool: ``train.router_pool_seqs`` sequences of ``train.seq_len`` per domain from the train
        split (chosen by ``default_rng([train.seed, domain index])``), and the dense parent's routing-
        distillation targets of each (``losses.router_targets``, the same call and compute dtype the router
        step used to make every step), stored batch-major ``dist [N, L, T, E]`` float32. Also caches the
        held-out routing targets of the evaluations."""
        from readme_jax.data.pipeline import PackedSequence, domain_tokens, num_sequences
        from readme_jax.train import steps as steps_lib
        t, bsz = self.cfg.train, self.cfg.extract.calib_batch
        ids, masks, doms = [], [], []
        for di, d in enumerate(self.corpus.domains):
            tokens = domain_tokens(self.corpus, d, "train", self.tokenizer)
            have = num_sequences(len(tokens), t.seq_len)
            if have < t.router_pool_seqs:
                raise PipelineError(
                    f"domain {d!r}: {self.corpus.path(d, 'train')} holds {len(tokens):,} tokens = {have} sequences "
                    f"of {t.seq_len}; train.router_pool_seqs={t.router_pool_seqs} needs "
                    f"{t.router_pool_seqs * t.seq_len + 1:,}. Lower train.router_pool_seqs or add text.")
            pick = np.sort(np.random.default_rng([t.seed, di]).choice(have, t.router_pool_seqs, replace=False))
            pack = PackedSequence(tokens, t.seq_len, self.tokenizer.bos_id)
            for i in pick:
                s = pack(int(i))
                ids.append(s["input_ids"]), masks.append(s["loss_mask"]), doms.append(di)
        ids = np.stack(ids)
        graphdef, state = nnx.split(self.dense)
        if t.dtype != "float32":
            graphdef = steps_lib.compute_graphdef(self.dense, t.dtype)
        specific = jnp.asarray(self.masks.specific)

        @jax.jit
        def targets(state, batch):
            dist = router_targets(nnx.merge(graphdef, state), batch, None, specific, use_abs=t.target_abs)
            return jnp.swapaxes(dist, 0, 1)                         # [B, L, T, E]

        t0 = time.time()
        dist = []
        for i in tqdm(range(0, len(ids), bsz), desc="targets", unit="batch", disable=not self.progress):
            dist.append(np.asarray(targets(state, jnp.asarray(ids[i:i + bsz])), np.float32))
        dist = np.concatenate(dist)
        path = self.router_targets_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, input_ids=ids.astype(np.int32), loss_mask=np.stack(masks).astype(np.float32), dist=dist,
                 domain=np.asarray(doms, np.int32), domains=np.asarray(self.corpus.domains, str))
        os.replace(tmp, path)
        self.__dict__.pop("router_pool", None)
        self.log.write({"event": "targets", "sequences": len(ids), "tokens": int(ids.size),
                        "seconds": round(time.time() - t0, 1)})
        _say(f"[targets] {len(ids)} sequences x {t.seq_len} tokens, dist {tuple(dist.shape)} "
             f"({dist.nbytes / 2**20:.1f} MiB, {time.time() - t0:.1f} s) -> {path}")
        self.heldout_routing()

    def heldout_routing(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{domain: (input windows int32[W, T], argmax over experts of the layer-summed dense ``dist``
        int32[W, T])} of the held-out routing windows; cached in ``extract/heldout_routing.npz`` and
        recomputed (once, with the dense parent) when the cache is missing or holds other windows."""
        from readme_jax.eval.perplexity import heldout_windows
        ev = self.cfg.eval
        windows = {d: heldout_windows(self.corpus, d, self.tokenizer, seq_len=ev.seq_len,
                                      max_tokens=min(ev.routing_tokens, ev.max_tokens))[0]
                   for d in self.corpus.domains}
        path = self.heldout_routing_path
        if path.is_file():
            with np.load(path) as z:
                names = [str(x) for x in z["domains"]]
                if names == list(windows) and all(
                        np.array_equal(z[f"inputs_{i}"], windows[d]) for i, d in enumerate(names)):
                    return {d: (windows[d], z[f"target_{i}"]) for i, d in enumerate(names)}
        d_gd, d_state = nnx.split(self.dense)
        specific = jnp.asarray(self.masks.specific)
        use_abs = self.cfg.train.target_abs

        @jax.jit
        def target(d_state, ids):
            dist = router_targets(nnx.merge(d_gd, d_state), ids, None, specific, use_abs=use_abs)
            return jnp.argmax(jnp.sum(dist, 0), -1).astype(jnp.int32)

        out, arrays = {}, {"domains": np.asarray(list(windows), str)}
        for i, (d, inputs) in enumerate(windows.items()):
            tgt = np.concatenate([np.asarray(target(d_state, jnp.asarray(inputs[j:j + ev.batch])))
                                  for j in range(0, len(inputs), ev.batch)])
            out[d] = (inputs, tgt)
            arrays[f"inputs_{i}"], arrays[f"target_{i}"] = inputs, tgt
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return out

    def stage_rounds(self) -> None:
        model = self.fresh_model()
        trainer = self.trainer(model, self.router_pool)
        for phase in phases(self.cfg):
            if trainer.is_done(phase):
                trainer.load_done(phase)
            else:
                t0 = time.time()
                trainer.run(phase)
                _say(f"[{phase.name}] done in {time.time() - t0:.1f} s")
            tag = phase.name
            last = phase.round == self.cfg.train.rounds - 1
            want = (tag == "router_0") or (phase.kind == "expert" and self.cfg.eval.each_round and not last)
            if want and not self.eval_path(tag).exists():
                self._record_eval(tag, self._moe_metrics(model))
        self._model = model

    def stage_final_eval(self) -> None:
        self._record_eval("final", self._moe_metrics(self.trained_model()))   # run_pipeline prints the table

    def stage_export(self) -> None:
        """Write the Read-ME checkpoint beside ``export/``, reload it with ``load_pretrained``, compare
        logits on a held-out batch, then rename it into place (a failed check leaves no ``export/``)."""
        import shutil

        from readme_jax.convert.load import load_pretrained
        from readme_jax.eval.perplexity import heldout_windows
        from readme_jax.model.readme import save_readme
        model = self.trained_model()
        tmp = self.dir / ".export-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_readme(model, tmp, self.tokenizer, overwrite=True)
        back, tok = load_pretrained(tmp, dtype=None)
        ev = self.cfg.eval
        ids, _ = heldout_windows(self.corpus, self.corpus.domains[0], self.tokenizer, seq_len=ev.seq_len,
                                 max_tokens=ev.seq_len * ev.batch)
        ids = jnp.asarray(ids)
        err = float(jnp.max(jnp.abs(back(ids) - model(ids))))
        if not err <= 1e-5 or tok is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PipelineError(f"{self.export_dir}: the exported checkpoint does not reload to the same model "
                                f"(max |logit diff| {err}, tokenizer {'missing' if tok is None else 'ok'})")
        if self.export_dir.exists():
            shutil.rmtree(self.export_dir)
        os.replace(tmp, self.export_dir)
        _say(f"[export] {self.export_dir} (reloaded: logits match, max |diff| {err:.1e})")

    def stage_plots(self) -> None:
        from readme_jax.train.plots import make_plots
        paths = make_plots(self.dir)
        _say(f"[plots] {', '.join(str(p) for p in paths)}")

    # --------------------------------------------------------------------------------- evaluation
    def _perplexity(self, model) -> dict:
        from readme_jax.eval.perplexity import evaluate_perplexity
        ev = self.cfg.eval
        return evaluate_perplexity(model, self.tokenizer, self.corpus, seq_len=ev.seq_len,
                                   max_tokens=ev.max_tokens, batch_size=ev.batch, progress=self.progress)

    def _moe_metrics(self, model) -> dict:
        """Perplexity per domain, plus routing metrics on the same held-out windows (capped at
        eval.routing_tokens per domain): router accuracy against the dense parent's targets (cached once by
        :meth:`heldout_routing`; only the router runs here), locality, and the share of each domain's
        tokens sent to each expert."""
        ev = self.cfg.eval
        out = {"ppl": self._perplexity(model)}
        r_gd, r_state = nnx.split(model.router)

        @jax.jit
        def route(r_state, ids):
            return jnp.argmax(nnx.merge(r_gd, r_state)(ids), -1)

        E = self.masks.num_experts
        acc, loc, load = {}, {}, {}
        hits = total = same = pairs = 0
        for d, (inputs, target) in self.heldout_routing().items():
            routed = np.concatenate([np.asarray(route(r_state, jnp.asarray(inputs[i:i + ev.batch])))
                                     for i in range(0, len(inputs), ev.batch)])
            h, n = int((routed == target).sum()), routed.size
            s, p = routing_locality(routed)
            acc[d], loc[d] = h / n, s / max(p, 1)
            load[d] = (np.bincount(routed.ravel(), minlength=E) / n).tolist()
            hits, total, same, pairs = hits + h, total + n, same + s, pairs + p
        out.update(router_accuracy=hits / total, locality=same / max(pairs, 1), router_accuracy_by_domain=acc,
                   locality_by_domain=loc, load=load, routing_tokens=total)
        return out

    def _record_eval(self, tag: str, result: dict) -> None:
        record = {"event": "eval", "tag": tag, **result}
        self.log.drop(lambda r: r.get("event") == "eval" and r.get("tag") == tag)
        self.log.write(record)
        _write_json(self.eval_path(tag), record)
        ppl = ", ".join(f"{d} {v['ppl']:.3f}" for d, v in result["ppl"].items())
        extra = "" if "router_accuracy" not in result else (
            f"; router accuracy {result['router_accuracy']:.3f}, locality {result['locality']:.3f}")
        _say(f"[eval {tag}] ppl: {ppl}{extra}")

    def summary(self) -> str:
        """The closing table: per-domain perplexity of dense / after router round 0 / final, + routing."""
        evals = {t: json.loads(self.eval_path(t).read_text()) for t in ("dense", "router_0", "final")
                 if self.eval_path(t).exists()}
        cols = [t for t in ("dense", "router_0", "final") if t in evals]
        names = {"dense": "dense parent", "router_0": "MoE router_0", "final": "MoE final"}
        rows = [f"{'domain':<14}" + "".join(f"{names[c]:>15}" for c in cols)]
        domains = list(next(iter(evals.values()))["ppl"]) if evals else []
        for d in domains:
            rows.append(f"{d:<14}" + "".join(f"{evals[c]['ppl'][d]['ppl']:>15.3f}" for c in cols))
        for key, label in (("router_accuracy", "router accuracy"), ("locality", "routing locality")):
            rows.append(f"{label:<14}" + "".join(
                f"{evals[c][key]:>15.3f}" if key in evals[c] else f"{'-':>15}" for c in cols))
        return "held-out perplexity (per domain) and routing metrics\n" + "\n".join(rows)


# ------------------------------------------------------------------------------------------ driver
def stage_done(run: Run, stage: str) -> bool:
    """Whether ``stage``'s output exists (so the stage is skipped)."""
    cfg = run.cfg
    if stage == "dense":
        return cfg.model.source != "random-tiny" or (run.dense_dir / "config.json").is_file()
    if stage == "corpus":
        return (run.corpus_dir / "manifest.json").is_file() and not cfg.corpus.dir
    if stage == "dense_eval":
        return run.eval_path("dense").is_file()
    if stage == "stats":
        return run.scores_path.is_file()
    if stage == "extract":
        return run.masks_path.is_file()
    if stage == "targets":
        return run.router_targets_path.is_file()
    if stage == "rounds":
        if not run.masks_path.is_file():
            return False
        d = run.dir / "checkpoints"
        return all((d / p.name).is_dir() for p in phases(cfg)) and all(
            _phase_done(d / p.name) for p in phases(cfg)) and run.eval_path("router_0").is_file()
    if stage == "final_eval":
        return run.eval_path("final").is_file()
    if stage == "export":
        return (run.export_dir / "config.json").is_file()
    if stage == "plots":
        return False   # cheap; always redrawn from metrics.jsonl
    raise ValueError(stage)


def _phase_done(path: Path) -> bool:
    from readme_jax.train.checkpointing import PhaseCheckpoints
    return PhaseCheckpoints(path).is_done()


def run_pipeline(cfg: Config, run_dir: str | Path | None = None, *, stage: str | None = None,
                 progress: bool = True) -> Run:
    """Run every stage in order (or only ``stage``), skipping those whose outputs exist."""
    if stage is not None and stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    run = Run(cfg, run_dir or Path("runs") / cfg.name, progress=progress)
    run.write_config()
    t_start = time.time()
    todo = [stage] if stage else list(STAGES)
    for name in todo:
        if stage_done(run, name):
            _say(f"[{name}] output exists, skipped")
            continue
        t0 = time.time()
        getattr(run, f"stage_{name}")()
        run.log.write({"event": "stage", "stage": name, "seconds": round(time.time() - t0, 1)})
    if stage in (None, "final_eval"):
        _say(run.summary())
        _say(f"[done] {run.dir} in {time.time() - t_start:.1f} s")
    return run
