"""Model families: one registry entry per HF architecture (``config.json``'s ``architectures[0]``).

Every family is the Llama-shaped decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) of
:class:`readme_jax.model.config.LlamaConfig`; an entry says what differs:

  model_type  ``config.json``'s ``model_type`` (and the lookup key when ``architectures`` is absent)
  flags       the attention variant's LlamaConfig fields the family fixes (Qwen2: ``qkv_bias=True``); a
              config that leaves such a field None gets the family's value, a contradicting one is refused
  read_hf     ``(config.json dict, source) -> {LlamaConfig field: value}``: the family's own fields (Mistral's
              sliding_window), and a ConfigError for what is not built (Qwen2's per-layer sliding window)
  write_hf    ``LlamaConfig -> {config.json key: value}``: the family's own keys on export
  gguf_arch   GGUF ``general.architecture`` (and metadata prefix) of its llama.cpp files, whether their Q/K
              rows are permuted (llama: yes, qwen2: no)
  params      its parameters beyond the Llama table (convert/param_mapping.py): our path, HF and GGUF names,
              HF-layout dimension letters, from which the shapes and the sharding axes
              (parallel/sharding.py) follow

Adding a family = one ``register(Family(...))`` below (plus, for a new attention variant, its flag in
LlamaConfig, its parameters in ``model/llama.AttentionLayers`` and its use in ``decoder.project_qkv``).
Nothing else tests architecture names: callers ask :func:`family` / :func:`family_of_hf`.

Dimension letters: V vocab, D model, F ffn, Q query heads x head_dim, K kv heads x head_dim, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from readme_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: where it lives in our state, its HF and GGUF names, and its HF-layout dimensions.

    ours:          path in the model's ``nnx.State`` (e.g. ``("attn", "wq")``)
    hf, gguf:      tensor names; per-layer names contain ``{i}``
    per_layer:     True when ours is stacked along L and the source holds one tensor per layer
    transpose:     True for linear weights (HF ``[out, in]`` -> ours ``[in, out]``)
    dims:          dimension letters of the unstacked HF tensor (``"QD"`` for q_proj.weight [H*hd, D])
    rope_permuted: "q" / "k" when llama.cpp permuted the rows for interleaved RoPE
    """

    ours: tuple[str, ...]
    hf: str
    gguf: str
    per_layer: bool
    transpose: bool
    dims: str
    rope_permuted: str | None = None

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def gguf_name(self, layer: int | None = None) -> str:
        return self.gguf.format(i=layer)

    def source_shape(self, cfg) -> tuple[int, ...]:
        """The unstacked shape in the HF / dequantised-GGUF layout (``[out, in]`` for linear weights)."""
        size = {"V": cfg.vocab_size, "D": cfg.hidden_size, "F": cfg.intermediate_size,
                "Q": cfg.num_heads * cfg.head_dim, "K": cfg.num_kv_heads * cfg.head_dim}
        return tuple(size[c] for c in self.dims)

    def our_shape(self, cfg) -> tuple[int, ...]:
        """The shape in our state (stacked along L for per-layer parameters)."""
        shape = self.source_shape(cfg)
        if self.transpose:
            shape = shape[::-1]
        return (cfg.num_layers, *shape) if self.per_layer else shape

    @property
    def axes(self) -> str:
        """The dimension letters in our state (``"LDQ"`` for attn.wq): the sharding table's key."""
        dims = self.dims[::-1] if self.transpose else self.dims
        return ("L" if self.per_layer else "") + dims


_LAYER = "model.layers.{i}."

#: q/k/v projection biases (Qwen2; HF ``attention_bias``-style names), added by ``decoder.project_qkv``.
QKV_BIAS_PARAMS = (
    ParamSpec(("attn", "bq"), _LAYER + "self_attn.q_proj.bias", "blk.{i}.attn_q.bias", True, False, "Q"),
    ParamSpec(("attn", "bk"), _LAYER + "self_attn.k_proj.bias", "blk.{i}.attn_k.bias", True, False, "K"),
    ParamSpec(("attn", "bv"), _LAYER + "self_attn.v_proj.bias", "blk.{i}.attn_v.bias", True, False, "K"),
)


def _no_fields(hf: dict, source: str) -> dict:
    return {}


def _no_keys(cfg) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture (see the module docstring for the fields)."""

    architecture: str
    model_type: str
    flags: tuple[tuple[str, Any], ...] = ()
    read_hf: Callable[[dict, str], dict] = _no_fields
    write_hf: Callable[[Any], dict] = _no_keys
    params: tuple[ParamSpec, ...] = ()
    gguf_arch: str | None = None        # GGUF ``general.architecture`` (its metadata key prefix); None: no GGUF
    gguf_rope_permuted: bool = False    # llama.cpp's converter permuted Q/K rows for interleaved RoPE


FAMILIES: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Add ``fam`` to the registry (its architecture name must be new)."""
    if fam.architecture in FAMILIES:
        raise ConfigError(f"model family {fam.architecture!r} is already registered")
    FAMILIES[fam.architecture] = fam
    return fam


def family(architecture: str) -> Family:
    """The registered family of ``architecture`` (ConfigError naming the known ones)."""
    if architecture not in FAMILIES:
        raise ConfigError(f"architecture {architecture!r} is not supported (expected one of {sorted(FAMILIES)})")
    return FAMILIES[architecture]


def family_of_hf(hf: dict, source: str = "config.json") -> Family:
    """The family of an HF ``config.json`` dict: by ``architectures[0]``, else by ``model_type``."""
    archs = hf.get("architectures") or []
    if archs:
        name = archs[0]
        found = FAMILIES.get(name)
    else:
        name = hf.get("model_type")
        found = next((f for f in FAMILIES.values() if f.model_type == name), None)
    if found is None:
        raise ConfigError(f"{source}: architecture {name!r} is not supported (expected one of {sorted(FAMILIES)})")
    return found


def family_of_gguf(arch: str | None, source: str = "GGUF file") -> Family:
    """The family whose GGUF files say ``general.architecture = arch``."""
    found = next((f for f in FAMILIES.values() if f.gguf_arch is not None and f.gguf_arch == arch), None)
    if found is None:
        known = sorted(f.gguf_arch for f in FAMILIES.values() if f.gguf_arch)
        raise ConfigError(f"{source}: general.architecture is {arch!r}, expected one of {known}")
    return found


def param_axes() -> dict[str, str]:
    """Sharding letters of every family's own parameters, by ``"group.name"`` (parallel/sharding.py)."""
    return {".".join(p.ours): p.axes for fam in FAMILIES.values() for p in fam.params}


# ------------------------------------------------------------------------------------------- the families
def _llama_fields(hf: dict, source: str) -> dict:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{source}: attention_bias/mlp_bias=True is not supported (o_proj and MLP biases)")
    return {}


def _llama_keys(cfg) -> dict:
    return {"attention_bias": False, "mlp_bias": False}


def _qwen2_fields(hf: dict, source: str) -> dict:
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true (Qwen2's sliding window on the layers from "
                          f"max_window_layers on) is not supported; expected false")
    return {}


register(Family("LlamaForCausalLM", "llama", flags=(("qkv_bias", False),), read_hf=_llama_fields,
                write_hf=_llama_keys, gguf_arch="llama", gguf_rope_permuted=True))
register(Family("MistralForCausalLM", "mistral", flags=(("qkv_bias", False),),
                read_hf=lambda hf, source: {**_llama_fields(hf, source), "sliding_window": hf.get("sliding_window")},
                write_hf=lambda cfg: {**_llama_keys(cfg), "sliding_window": cfg.sliding_window}))
register(Family("Qwen2ForCausalLM", "qwen2", flags=(("qkv_bias", True),), read_hf=_qwen2_fields,
                write_hf=lambda cfg: {"use_sliding_window": False, "max_window_layers": cfg.num_layers},
                params=QKV_BIAS_PARAMS, gguf_arch="qwen2"))
