"""The science experiments' registry and budgets (``configs/science/default.yaml``; each experiment's settings
dataclass, in its own module, has the same defaults).

    s = load_settings()                      # or load_settings("configs/science/default.yaml", ["mc.items_per_domain=20"])
    s.mc.items_per_domain, s.ablate_lr.variants, EXPERIMENTS.names()

Every experiment reads one section; the section's values (plus the parent run's identity) are the
experiment's settings record (:mod:`readme_jax.science.folder`). A value of ``null`` where the default run has
the same knob means "the parent run's" (e.g. the dense baseline's token budget is Read-ME's expert tuning).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import yaml

from readme_jax.config.loader import apply_override, build, merge, plain
from readme_jax.errors import ConfigError
from readme_jax.registry import Registry

#: Every experiment: ``@EXPERIMENTS.register(name, SettingsDataclass)`` on ``fn(parent, settings, *,
#: progress) -> dict`` in its own module (imported by ``readme_jax/science/__init__.py``; that import order is
#: the order of ``all``). Its settings dataclass is its section here and in configs/science/default.yaml.
EXPERIMENTS = Registry("science experiment")


@functools.cache
def _settings_type(names: tuple[str, ...]) -> type:
    fields = [(n, EXPERIMENTS.entry(n).options, dataclasses.field(default_factory=EXPERIMENTS.entry(n).options))
              for n in names]
    return dataclasses.make_dataclass("ScienceSettings", fields, frozen=True)


def science_settings() -> Any:
    """The default settings: a frozen dataclass with one section (field) per registered experiment."""
    return _settings_type(EXPERIMENTS.names())()


def load_settings(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The defaults (:func:`science_settings`), then the YAML file ``path`` (one section per experiment), then
    ``a.b=c`` overrides; a :class:`~readme_jax.errors.ConfigError` names a bad file, key or value."""
    defaults = science_settings()
    sections = EXPERIMENTS.names()
    data = plain(defaults)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such settings file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections")
        unknown = sorted(set(loaded) - set(sections))
        if unknown:
            raise ConfigError(f"{p}: unknown section(s) {unknown}; known: {list(sections)}")
        data = merge(data, loaded)
    for item in overrides:
        data = apply_override(data, item, sections)
    return build(type(defaults), data)
