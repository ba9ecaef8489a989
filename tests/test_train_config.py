"""The run config as the training CLI sees it: every config file loads as written, overrides are typed, bad
values are one clear error (library and CLI)."""

from __future__ import annotations

import pytest
import yaml

from readme_jax.config import Config, load_config
from tests.tiny_run import REPO, train_cli


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_file_loads_with_each_value_it_names(name):
    """A YAML file is read on top of the defaults: every value it names is the config's, the rest default."""
    text = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    got, default = load_config(name).to_dict(), Config().to_dict()
    for section, values in text.items():
        if not isinstance(values, dict):
            assert got[section] == values, section
            continue
        for key, value in values.items():
            if isinstance(value, dict):          # a typed sub-section (model.random): the keys it names
                for sub, v in value.items():
                    assert got[section][key][sub] == v, f"{section}.{key}.{sub}"
                continue
            want = list(value) if isinstance(value, (list, tuple)) else value
            assert got[section][key] == want, f"{section}.{key}"
        if section == "router":       # the router section is RouterConfig's fields, checked by the model
            continue
        for key in set(default[section]) - set(values):
            assert got[section][key] == default[section][key], f"{section}.{key}"


def test_no_file_is_the_default_config_and_overrides_are_typed():
    assert load_config(None) == load_config(REPO / "configs" / "default.yaml")
    cfg = load_config("tiny", ["train.router_lr=1e-3", "train.rounds=3", "corpus.domains=[alpha,beta]",
                               "train.grad_clip=null", "eval.each_round=false"])
    assert cfg.train.router_lr == 1e-3 and cfg.train.rounds == 3 and cfg.corpus.domains == ("alpha", "beta")
    assert cfg.train.grad_clip is None and cfg.eval.each_round is False


@pytest.mark.slow(reason="runs the CLI in a fresh process (imports jax, compiles)")
def test_cli_bad_config_exits_with_message(tmp_path):
    proc = train_cli(tmp_path / "run", "extract.keep_ratio=0")
    assert proc.returncode == 2
    assert "extract.keep_ratio: expected a value in (0, 1], got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
