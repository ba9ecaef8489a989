"""``<run_dir>/stages.json``: the settings each stage ran with, so results never disagree with their config.

    records = StageRecords(run_dir)
    records.settings(stage, cfg)             # {"eval.seq_len": 64, "router": {...}, ...} of stage.keys
    stale = records.plan(STAGES, run)        # the evaluation stages to re-run; refuses a training change
    records.started(stage, cfg)              # before the stage runs (so a half-run stage is covered too)

A stage's record is written when it starts. On a rerun, a stage whose recorded settings differ from the
config's is *stale*: an evaluation stage (and every evaluation stage reading it) is re-run from the saved
outputs; any other stage cannot be, since its outputs (and training resumed from them) would mix two
configs, so the run is refused with a message naming the changed keys. A run folder made before these
records existed has only ``config.yaml``: every stage is taken to have run with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from readme_jax.atomic import atomic_write_json
from readme_jax.errors import StaleRunError

RECORDS_FILE = "stages.json"

# Keys whose default changed after run folders existed (or that were added with a default those folders did not
# run with): the value a stage ran with before. A record without the key is compared with this value, not the
# new default, and a folder refused for one of these keys is told the override that resumes it.
BEFORE_KEY: dict[str, Any] = {"train.experts": "fused", "extract.refit": False, "train.freeze_embedding": False}
# Keys of how a stage runs, not of what it computes (checkpoint cadence and writes, profiling): a resumed run
# may change them, and they never make a stage stale.
OPERATIONAL = frozenset({"train.checkpoint_every", "train.checkpoint_seconds", "train.async_checkpoint",
                         "train.keep_checkpoints",
                         "train.profile_steps"})


def key_value(cfg_dict: dict, key: str) -> Any:
    """The value of ``"section"`` or ``"section.key"`` in a plain config dict (None when absent)."""
    section, _, name = key.partition(".")
    value = cfg_dict.get(section)
    return value.get(name) if name and isinstance(value, dict) else value


def changed_keys(key: str, old: Any, new: Any, default: Any = None) -> list[str]:
    """The dotted keys at or under ``key`` whose values differ (``train`` -> ``train.expert_lr``, ...).

    ``default``: the config's default values at ``key``; a key missing from ``old`` (recorded before that
    key existed) whose new value is its default is not a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        dflt = default if isinstance(default, dict) else {}
        return [d for k in sorted(set(old) | set(new), key=str)
                if not (k not in old and k in dflt and new.get(k) == dflt[k])
                for d in changed_keys(f"{key}.{k}", old.get(k), new.get(k), dflt.get(k))]
    return [] if old == new else [key]


class StageRecords:
    """The records of one run folder (``enabled=False``: read but never written, processes other than 0)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.dir, self.enabled = Path(run_dir), enabled
        self.path = self.dir / RECORDS_FILE
        self._records = self._load()

    def _load(self) -> dict[str, dict]:
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise StaleRunError(f"{self.path}: not a JSON object of stage records; delete the run folder")
            return data
        return {}

    def settings(self, stage, cfg) -> dict[str, Any]:
        d = cfg.to_dict()
        return {k: key_value(d, k) for k in stage.keys}

    def changed(self, stage, cfg, legacy: dict | None = None) -> list[str]:
        """The keys of ``stage`` whose value differs from the one it ran with ([] if it never ran)."""
        if stage.name in self._records:
            old = self._records[stage.name]
        elif legacy is not None:
            old = {k: key_value(legacy, k) for k in stage.keys}
        else:
            return []
        now = self.settings(stage, cfg)
        defaults = type(cfg)().to_dict()
        for key, value in BEFORE_KEY.items():
            section, _, name = key.partition(".")
            defaults[section][name] = value
        return [d for k in stage.keys for d in changed_keys(k, old.get(k), now[k], key_value(defaults, k))
                if d not in OPERATIONAL]

    def plan(self, stages, run) -> set[str]:
        """The names of the evaluation stages to re-run (their outputs come from other settings); raises
        :class:`StaleRunError` naming the keys when another stage that has outputs ran with other settings.

        A changed key of a stage also counts for every stage that reads it (``needs``). A stage without
        outputs yet (it failed, or never ran) just runs with the new settings."""
        cfg = run.cfg
        legacy = None
        if not self._records and run.config_path.is_file():      # a folder from before the records
            legacy = yaml.safe_load(run.config_path.read_text()) or {}
        changed: dict[str, list[str]] = {}
        refused: dict[str, list[str]] = {}
        stale: set[str] = set()
        for st in stages:
            keys = self.changed(st, cfg, legacy)
            for n in st.needs:
                keys += [k for k in changed.get(n, []) if k not in keys]
            if not keys:
                continue
            changed[st.name] = keys
            if st.evaluation:
                stale.add(st.name)
            elif any(p.exists() for p in st.outputs(run)):
                refused[st.name] = keys
        if refused:
            what = "; ".join(f"stage {name!r}: {', '.join(keys)}" for name, keys in refused.items())
            before = [f"{k}={v!r}" for k, v in BEFORE_KEY.items() if any(k in ks for ks in refused.values())]
            if before:
                what += f" (their former defaults were {', '.join(before)}: pass that to resume it)"
            raise StaleRunError(f"{self.dir}: this run folder was made with other settings ({what}); "
                                "resuming would mix two runs. Use those settings, another --run-dir, or delete "
                                "the folder (on an existing folder only evaluation and plot settings may change).")
        if legacy is not None:        # adopt the old config as the record of every stage
            self._records = {st.name: {k: key_value(legacy, k) for k in st.keys} for st in stages}
        return stale

    def started(self, stage, cfg) -> None:
        """Record that ``stage`` runs with ``cfg``'s settings."""
        self._records[stage.name] = self.settings(stage, cfg)
        if self.enabled:
            atomic_write_json(self.path, self._records, indent=1)
