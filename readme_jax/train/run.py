"""One run folder: its paths and the objects its stages share, each built lazily, once.

    run = Run(cfg, "runs/tiny")
    run.masks_path, run.eval_path("final")          # paths (nothing is created)
    run.dense, run.tokenizer, run.corpus, run.masks  # loaded on first use
    run.trained_model()                               # the model after the last round

The stages (:mod:`readme_jax.train.stages`) read and write through this object only.
"""

from __future__ import annotations

import dataclasses

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from readme_jax.config import Config
from readme_jax.errors import ConfigError, PipelineError
from readme_jax.train.checkpointing import phase_done
from readme_jax.train.hooks import TrainHooks
from readme_jax.train.metrics_log import MetricsLog
from readme_jax.train.targets import RouterPool
from readme_jax.train.tensorboard import TensorBoardMirror
from readme_jax.train.trainer import Phase, Trainer, phase_dir, phases


def say(msg: str) -> None:
    """Print a progress line (process 0 only; above any progress bar)."""
    if jax.process_index() == 0:
        tqdm.write(msg)


class Run:
    """One run folder and the objects its stages share (loaded lazily, once).

    ``hooks`` are passed to every :class:`~readme_jax.train.trainer.Trainer` the run builds."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, progress: bool = True, hooks: TrainHooks | None = None):
        self.cfg, self.dir, self.progress, self.hooks = cfg, Path(run_dir), progress, hooks
        self.log = MetricsLog(self.dir / "metrics.jsonl", enabled=jax.process_index() == 0,
                              mirror=TensorBoardMirror(self.dir / "tensorboard", cfg))
        self._model = None

    # ------------------------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def dense_dir(self) -> Path:
        return self.dir / "dense"

    @property
    def texts_dir(self) -> Path:
        return self.dir / "texts"

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    @property
    def corpus_dir(self) -> Path:
        return Path(self.cfg.corpus.dir) if self.cfg.corpus.dir else self.dir / "corpus"

    def eval_path(self, tag: str) -> Path:
        return self.dir / "eval" / f"{tag}.json"

    @property
    def scores_path(self) -> Path:
        return self.dir / "extract" / "scores.npz"

    @property
    def grams_path(self) -> Path:
        return self.dir / "extract" / "grams.npy"

    @property
    def masks_path(self) -> Path:
        return self.dir / "extract" / "masks.npz"

    @property
    def report_path(self) -> Path:
        return self.dir / "extract" / "report.json"

    @property
    def router_targets_path(self) -> Path:
        return self.dir / "extract" / "router_targets.npz"

    @property
    def heldout_routing_path(self) -> Path:
        return self.dir / "extract" / "heldout_routing.npz"

    def phase_dir(self, phase: Phase) -> Path:
        return phase_dir(self.dir, phase)

    @property
    def export_dir(self) -> Path:
        return self.dir / "export"

    @property
    def plots_dir(self) -> Path:
        return self.dir / "plots"

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
        say(f"[dense] {src}: {model.num_params():,} params, vocab {model.config.vocab_size} "
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
    def router_pool(self) -> RouterPool:
        """The :class:`~readme_jax.train.targets.RouterPool` of stage 'targets' (checked against the config)."""
        path = self.router_targets_path
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run stage 'targets' first")
        pool = RouterPool.load(path)
        t = self.cfg.train
        n = t.router_pool_seqs * len(self.corpus.domains)
        want = (n, self.dense.config.num_layers, t.seq_len, self.masks.num_experts)
        if pool.dist.shape != want or pool.input_ids.shape != (n, t.seq_len):
            raise PipelineError(f"{path}: dist {pool.dist.shape} / input_ids {pool.input_ids.shape} do not match "
                                f"the config (dist {want}); delete it and rerun stage 'targets'")
        return pool

    def forget(self, *names: str) -> None:
        """Drop the cached objects ``names`` (a stage rewrote their files)."""
        for name in names:
            self.__dict__.pop(name, None)

    def router_config(self):
        try:
            return dataclasses.replace(self.cfg.router, vocab_size=self.dense.config.vocab_size,
                                       num_experts=self.masks.num_experts)
        except ValueError as e:
            raise ConfigError(f"router: {e}") from None

    def fresh_model(self):
        """The extracted Read-ME model before any tuning (deterministic in train.seed): tied or fused experts
        (train.experts), down-projections refit when extract.refit."""
        from readme_jax.extract.experts import readme_from_dense
        model = readme_from_dense(self.dense, self.masks, self.router_config(), rngs=nnx.Rngs(self.cfg.train.seed),
                                  tied=self.cfg.train.experts == "tied")
        e = self.cfg.extract
        if e.refit:
            import numpy as np
            from readme_jax.extract.refit import apply_refit
            if not self.grams_path.is_file():
                raise PipelineError(f"{self.grams_path}: missing; extract.refit needs stage 'stats' rerun")
            apply_refit(model, np.asarray(self.dense.ffn.w_down[...]), np.load(self.grams_path, mmap_mode="r"),
                        self.masks, ridge=e.refit_ridge)
        return model

    def trainer(self, model, pool: RouterPool | None = None) -> Trainer:
        teacher = self.dense if self.cfg.train.expert_loss != "lm" else None
        return Trainer(self.cfg, self.dir, model, pool, self.masks.specific, self.corpus, self.tokenizer,
                       self.log, progress=self.progress, hooks=self.hooks, teacher=teacher)

    def phases_done(self) -> bool:
        """Whether every phase of the schedule finished (nothing is loaded)."""
        return all(phase_done(self.phase_dir(p)) for p in phases(self.cfg))

    def set_trained_model(self, model) -> None:
        """Record ``model`` as the model after the last round (stage 'rounds' just trained it)."""
        self._model = model

    def model_after(self, phase: Phase, *, fused: bool = True, step: int | None = None):
        """The model right after ``phase``: the extracted model with the last router and the last backbone
        params of the schedule up to ``phase`` (each from its phase's final checkpoint; ``phase``'s own from its
        kept checkpoint ``step`` when given), experts in the fused per-expert layout (tied tables materialised;
        ``fused=False``: experts as trained)."""
        sched = phases(self.cfg)
        upto = sched[:sched.index(phase) + 1]
        model = self.fresh_model()
        trainer = self.trainer(model)
        missing = [p.name for p in upto if not trainer.is_done(p)]
        if missing:
            raise PipelineError(f"{self.dir}/checkpoints: phases {missing} are not finished; run stage 'rounds'")
        for p in {p.kind: p for p in upto}.values():
            trainer.load_done(p, step if p == phase else None)
        return model.untied() if fused else model

    def trained_model(self):
        """The model after the last round (every phase must be done)."""
        if self._model is None:
            self._model = self.model_after(phases(self.cfg)[-1])
        return self._model
