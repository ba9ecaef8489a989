"""The run config: the sections together, read from the embedded defaults, a YAML file and overrides.

``load_config(None)`` is the embedded default: the dataclass defaults are exactly ``configs/default.yaml``
(a test keeps the two equal), so ``python -m readme_jax.train`` needs no file. A YAML file is read *on
top of the defaults*: it names only what it changes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from readme_jax.config.checks import FIELD_CHECKS, check_config
from readme_jax.config.loader import apply_override, build, filled_elsewhere, merge, plain
from readme_jax.config.sections import (CorpusConfig, EvalConfig, ExtractConfig, MeshConfig, ModelConfig,
                                        TrainConfig)
from readme_jax.errors import ConfigError
from readme_jax.model.router import RouterConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    # the pipeline sets the router's vocab_size (the model's) and num_experts (one per corpus domain)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig,
                                             metadata=filled_elsewhere("vocab_size", "num_experts"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain values (the fields the pipeline fills in left out)."""
        return plain(self)

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


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _read_yaml(path: str | Path) -> tuple[Path, dict[str, Any]]:
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
    return p, loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The embedded defaults, then the YAML file ``path`` (if any), then ``overrides`` (``a.b=c``).

    A bare name (``tiny``) is looked up as ``configs/<name>.yaml``. The config's ``name`` defaults to
    the file's stem (``default`` without a file). Override values are YAML scalars
    (``train.router_lr=1e-3``, ``model.source=/ckpt``, ``corpus.domains=[code,prose]``,
    ``eval.max_tokens=null``) coerced to the field's type. Unknown sections / keys and values of the
    wrong type are a :class:`ConfigError` naming the file, the key, what was expected and what was found.
    """
    data = Config().to_dict()
    source = "<defaults>"
    if path is not None:
        p, loaded = _read_yaml(path)
        unknown = sorted(set(loaded) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{p}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
        data = merge(data, loaded)
        source = str(p)
    for item in overrides:
        data = apply_override(data, item, SECTIONS)
    if overrides:
        source += " + overrides"
    try:
        cfg = build(Config, data, checks=FIELD_CHECKS)
        check_config(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
