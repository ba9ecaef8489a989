"""The budgets of the science experiments (``configs/science/default.yaml``; the dataclass defaults are the same).

    s = load_settings()                      # or load_settings("configs/science/default.yaml", ["mc.items_per_domain=20"])
    s.mc.items_per_domain, s.ablate_lr.variants

Every experiment reads one section; the section's values (plus the parent run's identity) are the
experiment's settings record (:mod:`readme_jax.science.folder`). A value of ``null`` where the default run has
the same knob means "the parent run's" (e.g. the dense baseline's token budget is Read-ME's expert tuning).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from readme_jax.config.loader import apply_override, build, merge, plain
from readme_jax.errors import ConfigError
from readme_jax.eval.suite import SuiteSettings


@dataclasses.dataclass(frozen=True)
class DenseBaselineSettings:
    """The equal-size dense model: the parent's FFN pruned to one expert's width by the statistics of all
    domains together, tuned with Read-ME's expert-tuning schedule (rounds x expert_steps x expert_batch
    sequences, lr x decay per round, same data order) unless these override it."""
    expert_lr: float | None = None       # null: the parent run's train.expert_lr


@dataclasses.dataclass(frozen=True)
class LayerwiseSettings:
    """One linear top-1 router [D, E] per layer reading that layer's FFN input, trained on the parent's
    per-layer distillation targets of the router pool, on the dense parent's hidden states (computed once)."""
    steps: int = 300                     # full-batch AdamW updates of all L routers together
    lr: float = 3.0e-3
    redundancy_tokens: int = 1024        # held-out tokens per domain whose per-layer routes are counted


@dataclasses.dataclass(frozen=True)
class BoundsSettings:
    seed: int = 0                        # random routing's seed


@dataclasses.dataclass(frozen=True)
class MCSettings:
    """The built-in multiple-choice task (and an optional MMLU-format folder)."""
    items_per_domain: int = 24
    context_tokens: int = 64
    continuation_tokens: int = 24
    seed: int = 0
    batch: int = 8
    mmlu_dir: str | None = None          # a folder of MMLU-format <subject>_test.csv / _dev.csv files
    k_shot: int = 5


@dataclasses.dataclass(frozen=True)
class AblateLrSettings:
    """Expert learning rate (and the domain mixture at the best one), on a probe schedule every variant shares:
    ``base`` overrides (default: one round, router_0 + one expert phase of train.expert_steps; with the
    parent's settings that phase is the parent's own expert_0, reused), then each variant's overrides."""
    base: tuple[str, ...] = ("train.rounds=1",)
    variants: tuple[tuple[str, ...], ...] = (
        ("train.expert_lr=1e-4",), ("train.expert_lr=1e-3",), ("train.expert_lr=1e-3", "train.mixture=balanced"))


@dataclasses.dataclass(frozen=True)
class AblateSplitSettings:
    """Router steps vs expert steps at equal wall time: ``rounds`` round(s) whose expert phases get every
    expert step of the parent plus the steps that the parent's later router rounds' measured wall time buys
    (at the parent's median expert-step time)."""
    rounds: int = 1
    overrides: tuple[str, ...] = ()      # further overrides of the variant (e.g. the best ablate_lr setting)


@dataclasses.dataclass(frozen=True)
class AblateCalibSettings:
    calib_seqs: tuple[int, ...] = (16, 64)     # calibration sequences per domain; each is split in two halves


@dataclasses.dataclass(frozen=True)
class AblatePoolSettings:
    router_pool_seqs: tuple[int, ...] = (48,)  # besides the parent's own; router_0 only (router accuracy)


@dataclasses.dataclass(frozen=True)
class ScienceSettings:
    dense_baseline: DenseBaselineSettings = DenseBaselineSettings()
    layerwise: LayerwiseSettings = LayerwiseSettings()
    bounds: BoundsSettings = BoundsSettings()
    mc: MCSettings = MCSettings()
    ablate_lr: AblateLrSettings = AblateLrSettings()
    ablate_split: AblateSplitSettings = AblateSplitSettings()
    ablate_calib: AblateCalibSettings = AblateCalibSettings()
    ablate_pool: AblatePoolSettings = AblatePoolSettings()
    evaluate: SuiteSettings = SuiteSettings()    # the evaluation suite (readme_jax.eval.suite)

    def section(self, name: str) -> dict:
        return plain(getattr(self, name))


SECTIONS = tuple(f.name for f in dataclasses.fields(ScienceSettings))


def load_settings(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ScienceSettings:
    """The defaults, then the YAML file ``path`` (sections of :class:`ScienceSettings`), then ``a.b=c``
    overrides; a :class:`~readme_jax.errors.ConfigError` names a bad file, key or value."""
    data = plain(ScienceSettings())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such settings file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections")
        unknown = sorted(set(loaded) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{p}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        data = merge(data, loaded)
    for item in overrides:
        data = apply_override(data, item, SECTIONS)
    return build(ScienceSettings, data)
