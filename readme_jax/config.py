"""Typed run configuration: frozen dataclasses per concern, YAML files in ``configs/``, dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.rounds=3", "eval.max_tokens=2048"])
    cfg.train.router_lr                      # 5e-4
    cfg.to_dict()                            # the resolved config, as written to <run_dir>/config.yaml

``load_config(None)`` is the embedded default: the dataclass defaults below are exactly
``configs/default.yaml`` (a test keeps the two equal), so ``python -m readme_jax.train`` needs no file.
A YAML file is read *on top of the defaults*: it names only what it changes. Unknown sections / keys and
values of the wrong type are a :class:`ConfigError` that names the key, what was expected and what was
found. Override values are YAML scalars (``train.router_lr=1e-3``, ``model.source=/ckpt``,
``corpus.domains=[code,prose]``, ``eval.max_tokens=null``) coerced to the field's type.

The ``router`` section is passed through to :class:`readme_jax.model.router.RouterConfig` (its keys are
checked against that dataclass); ``vocab_size`` and ``num_experts`` are filled in by the pipeline.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value is invalid (the message names the key)."""


# ------------------------------------------------------------------------------------------- helpers
def _positive(section: str, **values) -> None:
    for k, v in values.items():
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"{section}.{k}: expected a positive integer, got {v!r}")


def _check_dtype(key: str, value: str, allowed: Sequence[str] = ("float32", "bfloat16", "float16")) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


# The default run's router (RouterConfig's own defaults, spelled out so config.yaml records them).
DEFAULT_ROUTER = {"dim": 256, "n_layers": 1, "n_heads": 4, "mlp_dim": 512, "embed_rank": 64}


# ------------------------------------------------------------------------------------------ sections
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dense parent model."""

    # "smollm2" (the pinned SmolLM2-135M GGUF), "random-tiny" (a random Llama of size `random`), or a
    # path readme_jax.load_pretrained reads (HF dir, .gguf, a dense checkpoint dir).
    source: str = "smollm2"
    # LlamaConfig fields of the random-tiny model (vocab_size is set from the tokenizer).
    random: Mapping[str, Any] | None = None
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


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Calibration statistics and expert extraction (method steps 2-3)."""

    keep_ratio: float = 0.5         # channels kept per domain and layer (paper: 0.5)
    calib_seqs: int = 16            # calibration sequences per domain (paper: 16)
    calib_seq_len: int = 512        # tokens per calibration sequence (paper: 4096)
    calib_batch: int = 4            # sequences per statistics batch
    num_experts: int | None = None  # must equal the number of domains when set (one expert per domain)

    def __post_init__(self):
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            raise ConfigError(f"extract.keep_ratio: expected a value in (0, 1], got {self.keep_ratio}")
        _positive("extract", calib_seqs=self.calib_seqs, calib_seq_len=self.calib_seq_len,
                  calib_batch=self.calib_batch)
        if self.num_experts is not None and self.num_experts < 1:
            raise ConfigError(f"extract.num_experts: expected >= 1 or null, got {self.num_experts}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Alternating router / expert tuning (method step 5)."""

    rounds: int = 2
    router_steps: int = 100         # optimizer steps per router round
    expert_steps: int = 12          # optimizer steps per expert round
    router_batch: int = 16          # sequences per router step (all micro-batches together)
    expert_batch: int = 4           # sequences per expert step
    seq_len: int = 512
    router_pool_seqs: int = 16      # router-training sequences per domain whose targets are precomputed once
    grad_accum: int = 1             # micro-batches per step (batch % grad_accum == 0)
    router_lr: float = 1e-3
    expert_lr: float = 1e-4
    lr_decay: float = 0.8           # lr x lr_decay per round
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0   # global-norm clipping; null = off
    dtype: str = "float32"          # compute dtype of the steps (bfloat16: f32 master weights)
    target_abs: bool = True         # router targets from |feat| (ARCHITECTURE) or signed feat (authors' code)
    seed: int = 0
    checkpoint_every: int = 4       # optimizer steps between mid-round checkpoints (and one at round end)

    def __post_init__(self):
        _positive("train", rounds=self.rounds, router_steps=self.router_steps, expert_steps=self.expert_steps,
                  router_batch=self.router_batch, expert_batch=self.expert_batch, seq_len=self.seq_len,
                  router_pool_seqs=self.router_pool_seqs,
                  grad_accum=self.grad_accum, checkpoint_every=self.checkpoint_every)
        for name in ("router_batch", "expert_batch"):
            if getattr(self, name) % self.grad_accum:
                raise ConfigError(f"train.{name}={getattr(self, name)} is not a multiple of "
                                  f"train.grad_accum={self.grad_accum}")
        for name in ("router_lr", "expert_lr"):
            v = getattr(self, name)
            if not v > 0:  # inf is allowed (a divergence test uses it); NaN and <= 0 are not
                raise ConfigError(f"train.{name}: expected a positive learning rate, got {v}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"train.lr_decay: expected a value in (0, 1], got {self.lr_decay}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip: expected > 0 or null, got {self.grad_clip}")
        _check_dtype("train.dtype", self.dtype, ("float32", "bfloat16"))


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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh of the training steps (readme_jax.parallel.mesh). ``data`` devices (-1 = all) each take
    an equal share of every micro-batch's rows (train.*_batch / grad_accum must divide by it); params and
    optimizer state are replicated. 1 = no mesh, one device."""

    data: int = 1                   # batch (data-parallel) axis

    def __post_init__(self):
        if self.data == 0 or self.data < -1:
            raise ConfigError(f"mesh.data: expected a positive size or -1, got {self.data}")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    # RouterConfig fields (see readme_jax.model.router); vocab_size / num_experts come from the model
    router: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_ROUTER))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check_domains(self, domains: Sequence[str]) -> None:
        """Cross-checks that need the corpus: one expert per domain."""
        n = self.extract.num_experts
        if n is not None and n != len(domains):
            raise ConfigError(f"extract.num_experts={n} but the corpus has {len(domains)} domains "
                              f"{list(domains)}; Read-ME extracts one expert per domain")
        if len(domains) < 2:
            raise ConfigError(f"the corpus has {len(domains)} domain(s) {list(domains)}; need at least 2 experts")


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML) as type ``tp``; ConfigError naming ``key`` when it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if tp is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(key, v, item) for v in value)
    if origin in (Mapping, dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)  # YAML reads 1e-3 as a string; float() takes it, and inf / nan
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(f):
            raise ConfigError(f"{key}: NaN is not a valid value")
        return f
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _router_fields() -> set[str] | None:
    try:
        from readme_jax.model.router import RouterConfig
    except ImportError:  # the router module is optional for config-only use
        return None
    return {f.name for f in dataclasses.fields(RouterConfig)} - {"vocab_size", "num_experts"}


def _build(data: Mapping[str, Any], source: str) -> Config:
    """A Config from a nested mapping (already merged over the defaults)."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "name":
            kwargs[name] = _coerce("name", value, str)
        elif name == "router":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: router: expected a mapping, got {value!r}")
            allowed = _router_fields()
            bad = sorted(set(value) - allowed) if allowed is not None else []
            if bad:
                raise ConfigError(f"{source}: unknown key(s) router.{bad}; known: {sorted(allowed)} "
                                  "(vocab_size and num_experts are set by the pipeline)")
            kwargs[name] = dict(value)
        else:
            cls = typing.get_type_hints(Config)[name]
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {name}: expected a mapping of keys, got {value!r}")
            types_ = _field_types(cls)
            bad = sorted(set(value) - set(types_))
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}; "
                                  f"known keys of {name}: {sorted(types_)}")
            fields = {k: _coerce(f"{name}.{k}", v, types_[k]) for k, v in value.items()}
            try:
                kwargs[name] = cls(**fields)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return Config(**kwargs)


def _merge(base: dict, over: Mapping, source: str, path: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "random":
            out[k] = _merge(out[k], v, source, f"{path}{k}.")
        else:
            out[k] = v
    return out


def apply_override(data: dict, item: str) -> dict:
    """Apply one ``a.b=value`` override to a nested dict (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if parts[0] not in _SECTIONS:
        raise ConfigError(f"override {item!r}: unknown section {parts[0]!r}; known: {sorted(_SECTIONS)}")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node = nxt
    if len(parts) == 1 and parts[0] != "name":
        raise ConfigError(f"override {item!r}: {parts[0]!r} is a section; name a key, e.g. {parts[0]}.<key>=...")
    node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The embedded defaults, then the YAML file ``path`` (if any), then ``overrides`` (``a.b=c``).

    A bare name (``tiny``) is looked up as ``configs/<name>.yaml``. The config's ``name`` defaults to
    the file's stem (``default`` without a file).
    """
    data = Config().to_dict()
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.exists() and not p.suffix and (CONFIG_DIR / f"{p}.yaml").exists():
            p = CONFIG_DIR / f"{p}.yaml"
        if not p.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        loaded = dict(loaded)
        loaded.setdefault("name", p.stem)
        bad = sorted(set(loaded) - set(_SECTIONS))
        if bad:
            raise ConfigError(f"{p}: unknown section(s) {bad}; known: {sorted(_SECTIONS)}")
        data = _merge(data, loaded, str(p))
        source = str(p)
    for item in overrides:
        data = apply_override(data, item)
    if overrides:
        source += " + overrides"
    return _build(data, source)
