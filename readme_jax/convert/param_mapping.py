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

This is the table every family shares; a family's own parameters (Qwen2's q/k/v biases ``attn.bq`` [L, H*hd],
``attn.bk`` / ``attn.bv`` [L, K*hd] <- ``...self_attn.{q,k,v}_proj.bias``) are in its entry of
:mod:`readme_jax.model.families`, which also defines :class:`ParamSpec`.
"""

from __future__ import annotations

from readme_jax.model.config import LlamaConfig
from readme_jax.model.families import ParamSpec, family

__all__ = ["ParamSpec", "llama_params"]

_LAYER = "model.layers.{i}."
GLOBAL_PARAMS = (
    ParamSpec(("tok", "embed"), "model.embed_tokens.weight", "token_embd.weight", False, False, "VD"),
    ParamSpec(("tok", "final_norm"), "model.norm.weight", "output_norm.weight", False, False, "D"),
)
LM_HEAD = ParamSpec(("tok", "lm_head"), "lm_head.weight", "output.weight", False, True, "VD")
LAYER_PARAMS = (
    ParamSpec(("attn", "attn_norm"), _LAYER + "input_layernorm.weight", "blk.{i}.attn_norm.weight", True, False,
              "D"),
    ParamSpec(("attn", "wq"), _LAYER + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight", True, True, "QD", "q"),
    ParamSpec(("attn", "wk"), _LAYER + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight", True, True, "KD", "k"),
    ParamSpec(("attn", "wv"), _LAYER + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight", True, True, "KD"),
    ParamSpec(("attn", "wo"), _LAYER + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight", True, True, "DQ"),
    ParamSpec(("attn", "mlp_norm"), _LAYER + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
              True, False, "D"),
    ParamSpec(("ffn", "w_gate"), _LAYER + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", True, True, "FD"),
    ParamSpec(("ffn", "w_up"), _LAYER + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", True, True, "FD"),
    ParamSpec(("ffn", "w_down"), _LAYER + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", True, True, "DF"),
)


def llama_params(cfg: LlamaConfig) -> tuple[ParamSpec, ...]:
    """Every parameter of a dense model with this config: the shared table (the LM head only when it is not
    tied) plus its family's own parameters."""
    head = () if cfg.tie_word_embeddings else (LM_HEAD,)
    return GLOBAL_PARAMS + head + LAYER_PARAMS + family(cfg.architecture).params
