"""config.json is checked (type and range, naming the file and the key) before any tensor is read; a bad path or
field is one line on stderr and a non-zero exit, with no leftover temporary folder."""

import json

import pytest

from readme_jax.convert.__main__ import main as convert_main
from readme_jax.convert.config_check import check_readme_dict
from readme_jax.errors import ConfigError
from readme_jax.eval.perplexity import main as perplexity_main
from readme_jax.model.config import LlamaConfig

BASE = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=64)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "32"), ("intermediate_size", -5), ("num_hidden_layers", 0), ("vocab_size", 2.5),
    ("num_attention_heads", True), ("rms_norm_eps", -1e-6), ("eos_token_id", [-1]), ("num_key_value_heads", 3),
])
def test_hf_config_field_is_named_before_any_tensor(tmp_path, capsys, key, value):
    src = tmp_path / "hf"
    src.mkdir()
    config = BASE.to_hf() | {key: value}
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"not a safetensors file: reading it would fail differently")
    assert convert_main([str(src), str(tmp_path / "out")]) == 1
    _one_line_error(capsys, str(src / "config.json"), key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]          # no OUT, no .out.tmp-* leftover


def test_our_checkpoint_config_is_checked(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(BASE.to_dict() | {"num_layers": 0,
                                                                     "readme_jax": {"kind": "dense", "version": 1}}))
    assert convert_main([str(ckpt), str(tmp_path / "out")]) == 1
    _one_line_error(capsys, "config.json", "num_layers")
    with pytest.raises(ConfigError, match="base.num_heads"):
        check_readme_dict({"num_experts": 2, "expert_dim": 8, "base": BASE.to_dict() | {"num_heads": "4"}},
                          source="config.json")
    with pytest.raises(ConfigError, match="expert_dim"):
        check_readme_dict({"num_experts": 2, "expert_dim": 0, "base": BASE.to_dict()}, source="config.json")


def test_perplexity_cli_bad_paths_are_one_line(tmp_path, capsys):
    assert perplexity_main(["--model", str(tmp_path / "MISSING"), "--corpus", str(tmp_path)]) == 2
    _one_line_error(capsys, "MISSING", "no such file")
    assert perplexity_main(["--model", str(tmp_path / "MISSING"), "--corpus", str(tmp_path / "nocorpus")]) == 2
    _one_line_error(capsys, "nocorpus")
