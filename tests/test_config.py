"""The run config: defaults == configs/default.yaml, typed sections, clear errors, YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from readme_jax.config import Config, load_config
from readme_jax.errors import ConfigError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.router import RouterConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_YAML = REPO / "configs" / "default.yaml"


def test_default_yaml_is_exactly_the_dataclass_defaults():
    assert yaml.safe_load(DEFAULT_YAML.read_text()) == Config().to_dict()
    assert load_config(None) == load_config(DEFAULT_YAML)


def test_router_defaults_live_in_router_config():
    """default.yaml's router section is RouterConfig()'s fields, except the two the pipeline fills in from
    the data (vocab_size: the model's vocabulary; num_experts: one per corpus domain)."""
    section = yaml.safe_load(DEFAULT_YAML.read_text())["router"]
    filled = {"vocab_size", "num_experts"}
    assert section == {f.name: getattr(RouterConfig(), f.name) for f in dataclasses.fields(RouterConfig)
                       if f.name not in filled}
    assert load_config(None).router == RouterConfig()


def test_all_configs_load_and_overrides_apply():
    tiny = load_config("tiny")
    assert tiny.model.source == "random-tiny" and tiny.name == "tiny"
    assert isinstance(tiny.model.random, LlamaConfig) and isinstance(tiny.router, RouterConfig)
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert {k: getattr(tiny.model.random, k) for k in raw["model"]["random"]} == raw["model"]["random"]
    assert {k: getattr(tiny.router, k) for k in raw["router"]} == raw["router"]
    paper = load_config(REPO / "configs" / "llama2_7b_readme.yaml")
    raw = yaml.safe_load((REPO / "configs" / "llama2_7b_readme.yaml").read_text())
    assert {k: getattr(paper.train, k) for k in raw["train"]} == raw["train"]
    cfg = load_config("tiny", ["train.router_lr=1e-3", "train.rounds=3", "corpus.domains=[alpha,beta]",
                               "train.grad_clip=null", "eval.each_round=false", "router.dim=64",
                               "model.random.num_layers=3"])
    assert cfg.train.router_lr == 1e-3 and cfg.train.rounds == 3 and cfg.corpus.domains == ("alpha", "beta")
    assert cfg.train.grad_clip is None and cfg.eval.each_round is False
    assert cfg.router.dim == 64 and cfg.model.random.num_layers == 3
    with pytest.raises(ConfigError, match=r"train.expert_lr: expected a finite positive learning rate, got inf"):
        load_config(None, ["train.expert_lr=inf"])      # divergence is injected through TrainHooks.lr_scale


@pytest.mark.parametrize("name, overrides", [
    ("default", []), ("llama2_7b_readme", []),
    ("tiny", ["model.random.rope_scaling={rope_type: linear, factor: 2.0}"]),
])
def test_to_yaml_loads_back_equal(tmp_path, name, overrides):
    """<run_dir>/config.yaml (``to_yaml``) reads back as the same config, nested typed sections included."""
    cfg = load_config(name, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, match", [
    ("extract.keep_ratio=0", r"extract.keep_ratio: expected a value in \(0, 1\], got 0"),
    ("extract.keep_ratio=1.5", r"extract.keep_ratio: expected a value in \(0, 1\], got 1.5"),
    ("train.rounds=two", r"train.rounds: expected an integer, got 'two'"),
    ("train.warmup=10", r"unknown key\(s\) \['train.warmup'\]"),
    ("trian.rounds=1", r"unknown section 'trian'"),
    ("train.expert_batch=3", r"train.expert_batch=3 is not a multiple of train.grad_accum=2"),
    ("train.router_lr=0", r"train.router_lr: expected a finite positive learning rate, got 0.0"),
    ("train.dtype=float64", r"train.dtype: expected one of"),
    ("router.width=3", r"unknown key\(s\) \['router.width'\]"),
    ("router.dim=abc", r"router.dim: expected an integer, got 'abc'"),
    ("router.dim=31", r"router: RouterConfig: dim=31 is not a multiple of n_heads=2"),
    ("router.num_experts=4", r"router.num_experts: set by the program"),
    ("router=3", r"'router' is a section"),
    ("model.random.hidden_sise=64", r"unknown key\(s\) \['model.random.hidden_sise'\]"),
    ("model.random.num_layers=two", r"model.random.num_layers: expected an integer, got 'two'"),
    ("model.random.dtype=bfloat16", r"model.random.dtype: set by the program"),
    ("model.random.num_kv_heads=3", r"model.random: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("model.random=null", r"model.random: required when model.source is 'random-tiny'"),
])
def test_bad_config_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_expert_count_must_match_domains():
    cfg = load_config("tiny", ["extract.num_experts=4"])
    with pytest.raises(ConfigError, match=r"extract.num_experts=4 but the corpus has 3 domains"):
        cfg.check_domains(["alpha", "beta", "gamma"])
    Config().check_domains(["a", "b"])  # unset: any count >= 2
