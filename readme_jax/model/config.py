"""Model configuration: one frozen dataclass for every Llama-shaped decoder family, parsed from HF config.json.

Both config.json styles are read: the hub's ``rope_theta`` / ``rope_scaling`` keys and transformers 5.x's
``rope_parameters``. The architectures accepted, and what each one fixes or adds (Qwen2's q/k/v biases,
Mistral's sliding window), are the entries of the family registry, ``readme_jax.model.families``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from readme_jax.errors import ConfigError
from readme_jax.model.families import family, family_of_hf

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


# What a layer keeps for the backward pass (decoder.run_layers): "none" keeps every activation; "full" keeps
# only the layer's input and recomputes the rest; "save_dots" keeps the matmul outputs that have no batch
# dimension (jax.checkpoint_policies.dots_with_no_batch_dims_saveable: the projections, not attention
# scores); "save_attention_out" keeps only each layer's attention output (the FFN is recomputed).
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-shaped dense decoder of one registered family (``architecture``: Llama, Mistral, Qwen2, ...).
    Dimension letters: V vocab, D model, F ffn, L layers, H heads, K kv heads."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling: None or a dict with "rope_type" in ROPE_TYPES and its fields (factor, low_freq_factor, ...)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    architecture: str = "LlamaForCausalLM"   # a key of model.families.FAMILIES
    qkv_bias: bool | None = None  # q/k/v projection biases [H*hd] / [K*hd]; None: the family's (Qwen2: True)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = True      # lax.scan over the stacked layers (fast compiles) vs a Python loop
    remat: str = "none"           # per-layer rematerialisation in the backward pass: REMAT_POLICIES

    def __post_init__(self):
        for name, value in family(self.architecture).flags:   # the attention variant the family fixes
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
            elif getattr(self, name) != value:
                raise ConfigError(f"{name}={getattr(self, name)!r} contradicts architecture {self.architecture!r}, "
                                  f"which has {name}={value!r} (leave it None for the family's)")
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", False)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        rope = self.rope_scaling_dict
        if rope is not None and rope.get("rope_type", "default") not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {rope.get('rope_type')!r} is not supported "
                              f"(expected one of {ROPE_TYPES})")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _dtype_name(getattr(self, name)))
        if isinstance(self.remat, bool):           # configs saved before the policies: on/off
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat: expected one of {list(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "LlamaConfig":
        if isinstance(changes.get("rope_scaling"), dict):
            changes["rope_scaling"] = tuple(sorted(changes["rope_scaling"].items()))
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "LlamaConfig":
        """Parse an HF ``config.json`` dict of a registered family (``model.families``), old or new rope keys."""
        fam = family_of_hf(hf, source)

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r}")
            return hf[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope_params.pop("rope_theta", 10000.0))
        rope_params.pop("rope_theta", None)
        scaling = hf.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = dict(scaling)
            rtype = scaling.pop("rope_type", scaling.pop("type", "default"))
            scaling["rope_type"] = rtype
            if rtype == "default":
                scaling = None
            elif rtype not in ROPE_TYPES:
                raise ConfigError(f"{source}: rope type {rtype!r} is not supported (expected one of {ROPE_TYPES})")
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        fields = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            architecture=fam.architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(fam.read_hf(hf, source))
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (expected 'silu')")
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict (hub style: ``rope_theta`` / ``rope_scaling``)."""
        out = {
            "architectures": [self.architecture],
            "model_type": family(self.architecture).model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        out.update(family(self.architecture).write_hf(self))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return cls(**d)
