"""Name tables between our Flax parameters and the HF / GGUF tensor names (no transforms here).

Our parameters live in the ``nnx.State`` of :class:`readme_jax.model.llama.Llama`, weights laid out for
``y = x @ W`` and stacked along a leading L axis. HF (and GGUF, once dequantised) store one ``[out, in]``
tensor per layer. Shapes, with V vocab, D model, F ffn, L layers, H heads, K kv heads, hd head dim:

=================  ==================  ===========================================  ====================  ============
ours               stacked shape       HF name (unstacked shape)                    GGUF name             transform
=================  ==================  ===========================================  ====================  ============
tok.embed          [V, D]              model.embed_tokens.weight [V, D]             token_embd.weight     -
tok.final_norm     [D]                 model.norm.weight [D]                        output_norm.weight    -
tok.lm_head        [D, V]              lm_head.weight [V, D] (absent when tied)     output.weight         transpose
attn.attn_norm     [L, D]              model.layers.{i}.input_layernorm.weight [D]  blk.{i}.attn_norm     -
attn.wq            [L, D, H*hd]        ...self_attn.q_proj.weight [H*hd, D]         blk.{i}.attn_q        transpose
attn.wk            [L, D, K*hd]        ...self_attn.k_proj.weight [K*hd, D]         blk.{i}.attn_k        transpose
attn.wv            [L, D, K*hd]        ...self_attn.v_proj.weight [K*hd, D]         blk.{i}.attn_v        transpose
attn.wo            [L, H*hd, D]        ...self_attn.o_proj.weight [D, H*hd]         blk.{i}.attn_output   transpose
attn.mlp_norm      [L, D]              ...post_attention_layernorm.weight [D]       blk.{i}.ffn_norm      -
ffn.w_gate         [L, D, F]           ...mlp.gate_proj.weight [F, D]               blk.{i}.ffn_gate      transpose
ffn.w_up           [L, D, F]           ...mlp.up_proj.weight [F, D]                 blk.{i}.ffn_up        transpose
ffn.w_down         [L, F, D]           ...mlp.down_proj.weight [D, F]               blk.{i}.ffn_down      transpose
=================  ==================  ===========================================  ====================  ============

GGUF names take a ``.weight`` suffix. llama.cpp additionally permutes the rows of Q and K for its
interleaved RoPE; :mod:`readme_jax.convert.gguf_io` undoes that (``rope_permuted`` below).
"""

from __future__ import annotations

import dataclasses

from readme_jax.model.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: where it lives in our state, its HF and GGUF names, and its HF-layout shape.

    ours:          path in the model's ``nnx.State`` (e.g. ``("attn", "wq")``)
    hf, gguf:      tensor names; per-layer names contain ``{i}``
    per_layer:     True when ours is stacked along L and the source holds one tensor per layer
    transpose:     True for linear weights (HF ``[out, in]`` -> ours ``[in, out]``)
    rope_permuted: "q" / "k" when llama.cpp permuted the rows for interleaved RoPE
    """

    ours: tuple[str, ...]
    hf: str
    gguf: str
    per_layer: bool
    transpose: bool
    rope_permuted: str | None = None

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def gguf_name(self, layer: int | None = None) -> str:
        return self.gguf.format(i=layer)

    def source_shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """The unstacked shape in the HF / dequantised-GGUF layout (``[out, in]`` for linear weights)."""
        V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {
            ("tok", "embed"): (V, D), ("tok", "final_norm"): (D,), ("tok", "lm_head"): (V, D),
            ("attn", "attn_norm"): (D,), ("attn", "mlp_norm"): (D,),
            ("attn", "wq"): (q, D), ("attn", "wk"): (kv, D), ("attn", "wv"): (kv, D), ("attn", "wo"): (D, q),
            ("ffn", "w_gate"): (F, D), ("ffn", "w_up"): (F, D), ("ffn", "w_down"): (D, F),
        }[self.ours]

    def our_shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """The shape in our state (stacked along L for per-layer parameters)."""
        shape = self.source_shape(cfg)
        if self.transpose:
            shape = shape[::-1]
        return (cfg.num_layers, *shape) if self.per_layer else shape


_LAYER = "model.layers.{i}."
GLOBAL_PARAMS = (
    ParamSpec(("tok", "embed"), "model.embed_tokens.weight", "token_embd.weight", False, False),
    ParamSpec(("tok", "final_norm"), "model.norm.weight", "output_norm.weight", False, False),
)
LM_HEAD = ParamSpec(("tok", "lm_head"), "lm_head.weight", "output.weight", False, True)
LAYER_PARAMS = (
    ParamSpec(("attn", "attn_norm"), _LAYER + "input_layernorm.weight", "blk.{i}.attn_norm.weight", True, False),
    ParamSpec(("attn", "wq"), _LAYER + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight", True, True, "q"),
    ParamSpec(("attn", "wk"), _LAYER + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight", True, True, "k"),
    ParamSpec(("attn", "wv"), _LAYER + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight", True, True),
    ParamSpec(("attn", "wo"), _LAYER + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight", True, True),
    ParamSpec(("attn", "mlp_norm"), _LAYER + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
              True, False),
    ParamSpec(("ffn", "w_gate"), _LAYER + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", True, True),
    ParamSpec(("ffn", "w_up"), _LAYER + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", True, True),
    ParamSpec(("ffn", "w_down"), _LAYER + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", True, True),
)


def llama_params(cfg: LlamaConfig) -> tuple[ParamSpec, ...]:
    """Every parameter of a dense Llama with this config (the LM head only when it is not tied)."""
    head = () if cfg.tie_word_embeddings else (LM_HEAD,)
    return GLOBAL_PARAMS + head + LAYER_PARAMS
