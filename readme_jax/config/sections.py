"""The run config's sections: one frozen dataclass per concern, each checking its own values.

The ``router`` section is :class:`readme_jax.model.router.RouterConfig` itself and ``model.random`` /
``model.architecture`` a :class:`readme_jax.model.config.LlamaConfig` (their defaults live there);
:mod:`readme_jax.config.run` assembles the sections into :class:`~readme_jax.config.run.Config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from readme_jax.config.loader import filled_elsewhere
from readme_jax.errors import ConfigError
from readme_jax.model.config import REMAT_POLICIES, LlamaConfig
from readme_jax.model.dispatch import DISPATCHERS


def _positive(section: str, **values) -> None:
    for k, v in values.items():
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"{section}.{k}: expected a positive integer, got {v!r}")


def _check_dtype(key: str, value: str, allowed: Sequence[str] = ("float32", "bfloat16", "float16")) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dense parent model."""

    # "smollm2" (the pinned SmolLM2-135M GGUF), "random-tiny" (a random Llama of size `random`), or a
    # path readme_jax.load_pretrained reads (HF dir, .gguf, a dense checkpoint dir).
    source: str = "smollm2"
    # LlamaConfig fields of the random-tiny model. vocab_size is the size of the BPE trained for it (the
    # model then takes the tokenizer's); the special ids and dtypes are set by the pipeline.
    random: LlamaConfig | None = dataclasses.field(default=None, metadata=filled_elsewhere(
        "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "param_dtype"))
    # LlamaConfig fields of the dense model for ``python -m readme_jax.train --plan`` when model.source has no
    # config.json on this machine (planning a run whose weights are elsewhere); never used to load weights.
    architecture: LlamaConfig | None = dataclasses.field(default=None, metadata=filled_elsewhere(
        "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "param_dtype"))
    dtype: str = "float32"          # dtype the dense weights are loaded in

    def __post_init__(self):
        if not self.source:
            raise ConfigError("model.source: must name a model ('smollm2', 'random-tiny' or a path)")
        if self.source == "random-tiny" and not self.random:
            raise ConfigError("model.random: required when model.source is 'random-tiny' "
                              "(LlamaConfig fields, e.g. {hidden_size: 64, num_layers: 2, ...})")
        _check_dtype("model.dtype", self.dtype)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Per-domain corpus: an existing one, a user folder, the default sources, or a synthetic one."""

    dir: str | None = None          # an existing built corpus; null -> build into <run_dir>/corpus
    from_dir: str | None = None     # build from SRC/<domain>/*.txt|*.jsonl (RedPajama layout)
    synthetic: bool = False         # build from small generated texts (tiny config; offline)
    domains: tuple[str, ...] | None = None   # subset / order of the domains (null = all)
    seed: int = 0                   # train/heldout split seed
    heldout_fraction: float = 0.05
    min_heldout_chars: int = 180_000

    def __post_init__(self):
        if self.dir and (self.from_dir or self.synthetic):
            raise ConfigError("corpus: set only one of corpus.dir, corpus.from_dir, corpus.synthetic")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"corpus.heldout_fraction: expected a value in (0, 0.5), got {self.heldout_fraction}")
        if self.seed < 0 or self.min_heldout_chars < 0:
            bad = "seed" if self.seed < 0 else "min_heldout_chars"
            raise ConfigError(f"corpus.{bad}: expected an integer >= 0, got {getattr(self, bad)}")
        if self.domains is not None and (not self.domains or len(set(self.domains)) != len(self.domains)):
            raise ConfigError(f"corpus.domains: expected distinct domain names or null, got {list(self.domains)}")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Calibration statistics and expert extraction (method steps 2-3)."""

    keep_ratio: float = 0.5         # channels kept per domain and layer (paper: 0.5)
    calib_seqs: int = 16            # calibration sequences per domain (paper: 16)
    calib_seq_len: int = 512        # tokens per calibration sequence (paper: 4096)
    calib_batch: int = 4            # sequences per statistics batch
    num_experts: int | None = None  # must equal the number of domains when set (one expert per domain)
    refit: bool = True              # least-squares down-projections on the calibration activations (extract/refit.py)
    refit_ridge: float = 0.01       # ridge towards the dense rows, relative to the mean Gram diagonal

    def __post_init__(self):
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            raise ConfigError(f"extract.keep_ratio: expected a value in (0, 1], got {self.keep_ratio}")
        _positive("extract", calib_seqs=self.calib_seqs, calib_seq_len=self.calib_seq_len,
                  calib_batch=self.calib_batch)
        if self.num_experts is not None and self.num_experts < 1:
            raise ConfigError(f"extract.num_experts: expected >= 1 or null, got {self.num_experts}")
        if not (math.isfinite(self.refit_ridge) and self.refit_ridge > 0):
            raise ConfigError(f"extract.refit_ridge: expected a finite value > 0, got {self.refit_ridge}")


MIXTURES = ("natural", "balanced")   # train.mixture: domains by size, or in equal shares
EXPERT_FORMS = ("tied", "fused")     # train.experts: one weight per channel | independent copies per expert
EXPERT_LOSSES = ("lm", "kd", "mix")  # train.expert_loss: data labels | the dense parent's distribution | both


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Alternating router / expert tuning (method step 5)."""

    rounds: int = 1
    router_steps: int = 100         # optimizer steps per router round
    expert_steps: int = 40          # optimizer steps per expert round
    router_batch: int = 16          # sequences per router step (all micro-batches together)
    expert_batch: int = 4           # sequences per expert step
    seq_len: int = 512
    router_pool_seqs: int = 16      # router-training sequences per domain whose targets are precomputed once
    grad_accum: int = 1             # micro-batches per step (batch % grad_accum == 0)
    router_lr: float = 1e-3
    expert_lr: float = 2e-4
    lr_decay: float = 0.8           # lr x lr_decay per round
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0   # global-norm clipping; null = off
    dtype: str = "float32"          # compute dtype of the steps (bfloat16: f32 master weights)
    target_abs: bool = True         # router targets from |feat| (docs/architecture.md) or signed feat (authors' code)
    seed: int = 0
    checkpoint_every: int | None = None       # optimizer steps between mid-round checkpoints (null: by time)
    checkpoint_seconds: float | None = 300.0  # training seconds between mid-round checkpoints (null: by steps)
    async_checkpoint: bool = False  # write checkpoints in a background thread (+ a copy of the state meanwhile)
    keep_checkpoints: int | None = 1  # checkpoints kept per phase (null: every one, for `science curve`)
    remat: str = "none"             # activation rematerialisation per layer (REMAT_POLICIES, model/config.py)
    profile_steps: int = 0          # > 0: a profiler trace of that many steps after the first -> <run>/profile
    mixture: str = "natural"        # expert-tuning domain mix: natural (by size) | balanced (equal shares)
    dispatcher: str | None = None   # the expert phase's local MoE dispatcher (model.dispatch.DISPATCHERS); null: default
    experts: str = "tied"           # expert tuning on tied channel tables (authors' masked-dense form) | fused copies
    expert_loss: str = "lm"         # lm: next-token CE | kd: forward KL to the dense parent | mix: both
    kd_weight: float = 0.5          # mix: loss = (1 - kd_weight) CE + kd_weight T^2 KL
    kd_temperature: float = 1.0     # T of the distillation softmaxes (teacher and student)
    freeze_embedding: bool = True   # expert phases leave the (tied) embedding / LM head as extracted

    def __post_init__(self):
        _positive("train", rounds=self.rounds, router_steps=self.router_steps, expert_steps=self.expert_steps,
                  router_batch=self.router_batch, expert_batch=self.expert_batch, seq_len=self.seq_len,
                  router_pool_seqs=self.router_pool_seqs,
                  grad_accum=self.grad_accum)
        if self.checkpoint_every is not None:
            _positive("train", checkpoint_every=self.checkpoint_every)
        if self.keep_checkpoints is not None:
            _positive("train", keep_checkpoints=self.keep_checkpoints)
        if self.checkpoint_seconds is not None and not (isinstance(self.checkpoint_seconds, (int, float))
                                                        and math.isfinite(self.checkpoint_seconds)
                                                        and self.checkpoint_seconds > 0):
            raise ConfigError(f"train.checkpoint_seconds: expected a number of seconds > 0 or null, got "
                              f"{self.checkpoint_seconds!r}")
        for name in ("router_batch", "expert_batch"):
            if getattr(self, name) % self.grad_accum:
                raise ConfigError(f"train.{name}={getattr(self, name)} is not a multiple of "
                                  f"train.grad_accum={self.grad_accum}")
        for name in ("router_lr", "expert_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"train.{name}: expected a finite positive learning rate, got {v}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"train.lr_decay: expected a value in (0, 1], got {self.lr_decay}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"train.grad_clip: expected a finite number > 0 or null, got {self.grad_clip}")
        if self.seed < 0:
            raise ConfigError(f"train.seed: expected an integer >= 0, got {self.seed}")
        _check_dtype("train.dtype", self.dtype, ("float32", "bfloat16"))
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"train.remat: expected one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.mixture not in MIXTURES:
            raise ConfigError(f"train.mixture: expected one of {list(MIXTURES)}, got {self.mixture!r}")
        if self.dispatcher is not None and self.dispatcher not in DISPATCHERS:
            raise ConfigError(f"train.dispatcher: expected null or one of {list(DISPATCHERS.names())}, "
                              f"got {self.dispatcher!r}")
        if not (isinstance(self.profile_steps, int) and self.profile_steps >= 0):
            raise ConfigError(f"train.profile_steps: expected an integer >= 0, got {self.profile_steps!r}")
        if self.experts not in EXPERT_FORMS:
            raise ConfigError(f"train.experts: expected one of {list(EXPERT_FORMS)}, got {self.experts!r}")
        if self.expert_loss not in EXPERT_LOSSES:
            raise ConfigError(f"train.expert_loss: expected one of {list(EXPERT_LOSSES)}, got {self.expert_loss!r}")
        if not (math.isfinite(self.kd_weight) and 0.0 <= self.kd_weight <= 1.0):
            raise ConfigError(f"train.kd_weight: expected a value in [0, 1], got {self.kd_weight}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ConfigError(f"train.kd_temperature: expected a finite value > 0, got {self.kd_temperature}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out perplexity (the protocol of readme_jax.eval.perplexity) and routing metrics."""

    seq_len: int = 512
    max_tokens: int = 4096          # held-out tokens scored per domain per evaluation
    batch: int = 4
    routing_tokens: int = 1024      # held-out tokens per domain for router accuracy / locality / load
    each_round: bool = False        # also evaluate after every expert round (else: after router round 0 + final)

    def __post_init__(self):
        _positive("eval", seq_len=self.seq_len, max_tokens=self.max_tokens, batch=self.batch,
                  routing_tokens=self.routing_tokens)
        if self.max_tokens < self.seq_len:
            raise ConfigError(f"eval.max_tokens={self.max_tokens} is less than one window of "
                              f"eval.seq_len={self.seq_len}")


MESH_AXES = ("data", "fsdp", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh of the train steps (readme_jax.parallel.mesh): axes ``data`` (params replicated, rows
    split), ``fsdp`` (params, gradients and optimizer state sharded on their model dimension D, rows split)
    and ``expert`` (the experts' E axis sharded, tokens sent to their expert's device by an all_to_all; rows
    split). Every micro-batch's rows are split over all three axes. One size may be -1: the devices left.
    The product must be the number of devices used (1 x 1 x 1: one device)."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        for name, v in sizes.items():
            if not isinstance(v, int) or v == 0 or v < -1:
                raise ConfigError(f"mesh.{name}: expected a positive size or -1, got {v!r}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (the devices left), got {sizes}")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}
