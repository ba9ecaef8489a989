"""Type and range checks of a checkpoint's config.json, run before any tensor is read, so a bad field is one
line naming the file and the key (``hidden_size: "32"`` used to surface as "has shape [259, 32], expected
[259, 32]", and ``num_hidden_layers: 0`` only at save time).

    check_hf_config(json.loads(path.read_text()), source=str(path))       # an HF Llama / Mistral config.json
    check_llama_dict(config, source=...)                                  # our dense checkpoint's config
    check_readme_dict(config, source=...)                                 # a Read-ME checkpoint's config
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from readme_jax.errors import ConfigError

# Kinds: "pos" an integer >= 1, "id" an integer >= 0 (a token id), "real+" a finite number > 0, "bool".
_HF = {"vocab_size": "pos", "hidden_size": "pos", "intermediate_size": "pos", "num_hidden_layers": "pos",
       "num_attention_heads": "pos", "num_key_value_heads": "pos?", "head_dim": "pos?",
       "max_position_embeddings": "pos?", "rms_norm_eps": "real+?", "rope_theta": "real+?",
       "tie_word_embeddings": "bool?", "bos_token_id": "id?", "eos_token_id": "ids?", "pad_token_id": "id?",
       "sliding_window": "pos?"}
_OURS = {"vocab_size": "pos", "hidden_size": "pos", "intermediate_size": "pos", "num_layers": "pos",
         "num_heads": "pos", "num_kv_heads": "pos", "head_dim": "pos", "max_position_embeddings": "pos",
         "rms_norm_eps": "real+", "rope_theta": "real+", "tie_word_embeddings": "bool", "bos_token_id": "id?",
         "eos_token_id": "id?", "pad_token_id": "id?", "sliding_window": "pos?"}
_READ_ME = {"num_experts": "pos", "expert_dim": "pos", "tied": "bool?"}
_EXPECTED = {"pos": "an integer >= 1", "id": "an integer >= 0", "ids": "an integer >= 0 or a list of them",
             "real+": "a finite number > 0", "bool": "true or false"}


def _ok(kind: str, v: Any) -> bool:
    is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if kind == "pos":
        return is_int and v >= 1
    if kind == "id":
        return is_int and v >= 0
    if kind == "ids":
        return _ok("id", v) or (isinstance(v, list) and bool(v) and all(_ok("id", t) for t in v))
    if kind == "real+":
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return isinstance(v, bool)


def _check(config: Any, table: dict[str, str], source: str, where: str = "") -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: {where or 'the file'} must be a JSON object, got {type(config).__name__}")
    for key, kind in table.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if key not in config:
            if not optional:
                raise ConfigError(f"{source}: missing field {where}{key!r} ({_EXPECTED[kind]})")
            continue
        v = config[key]
        if v is None and optional:
            continue
        if not _ok(kind, v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:60] + "..."
            raise ConfigError(f"{source}: {where}{key}: expected {_EXPECTED[kind]}, got {shown}")


def _heads(config: dict, source: str, heads: str, kv: str, where: str = "") -> None:
    n, k = config.get(heads), config.get(kv) or config.get(heads)
    if n % k:
        raise ConfigError(f"{source}: {where}{heads} = {n} is not a multiple of {where}{kv} = {k}")


def check_hf_config(config: Any, *, source: str) -> None:
    """An HF config.json's model fields: types and ranges, heads divisible by kv heads (ConfigError)."""
    _check(config, _HF, source)
    _heads(config, source, "num_attention_heads", "num_key_value_heads")
    if config.get("head_dim") is None and config["hidden_size"] % config["num_attention_heads"]:
        raise ConfigError(f"{source}: hidden_size = {config['hidden_size']} is not a multiple of "
                          f"num_attention_heads = {config['num_attention_heads']} (and no head_dim is given)")


def check_llama_dict(config: Any, *, source: str, where: str = "") -> None:
    """Our dense checkpoint's config (``LlamaConfig.to_dict()``)."""
    _check(config, _OURS, source, where)
    _heads(config, source, "num_heads", "num_kv_heads", where)


def check_readme_dict(config: Any, *, source: str) -> None:
    """A Read-ME checkpoint's config: its experts and its ``base`` dense config."""
    _check(config, _READ_ME, source)
    check_llama_dict(config.get("base"), source=source, where="base.")
