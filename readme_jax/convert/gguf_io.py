"""GGUF files (llama.cpp): metadata -> LlamaConfig, tensors dequantised one at a time into the HF layout.

``gguf.GGUFReader`` memory-maps the file; ``gguf.quants.dequantize`` turns a tensor's blocks into float32
with shape ``[out, in]`` (the GGUF shape reversed), the HF layout. For ``llama`` files llama.cpp permutes
the rows of Q and K so its RoPE can rotate adjacent pairs; :func:`unpermute_rope` restores the HF rotate-half
order (``qwen2`` files keep the HF order). Which families have a GGUF form: model/families.py ``gguf_arch``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from readme_jax.convert.param_mapping import ParamSpec
from readme_jax.errors import CheckpointError, ConfigError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.families import family, family_of_gguf

#: Tensor types this loader dequantises (gguf.quants implements each of them).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: w [n_heads * hd, D] interleaved-pair rows -> rotate-half rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF model file: its metadata, config and tensors (dequantised lazily, one at a time)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file (expected a .gguf file)")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError / struct.error / OSError on bad input
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file ({_one_line(e)})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cfg: LlamaConfig | None = None

    # ------------------------------------------------------------------ metadata
    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: GGUF field {key} is malformed ({_one_line(e)})") from e

    def config(self, **overrides) -> LlamaConfig:
        """The LlamaConfig the GGUF metadata describes (``general.architecture``: a registered family's
        ``gguf_arch``, model/families.py: ``llama`` or ``qwen2``; its metadata keys carry that prefix)."""
        arch = self.field("general.architecture")
        try:
            fam = family_of_gguf(arch, str(self.path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from e

        def need(key: str):
            value = self.field(f"{arch}.{key}")
            if value is None:
                raise CheckpointError(f"{self.path}: GGUF field {arch}.{key} is missing")
            return value

        if (self.field(f"{arch}.expert_count") or 0) > 0:
            raise CheckpointError(f"{self.path}: {arch}.expert_count={self.field(f'{arch}.expert_count')} "
                                  "(a mixture of experts), expected a dense model")
        if "rope_freqs.weight" in self.tensors:
            raise CheckpointError(f"{self.path}: tensor rope_freqs.weight (llama3 RoPE frequencies) is not "
                                  "supported; convert from the HF checkpoint instead")
        D, H = int(need("embedding_length")), int(need("attention.head_count"))
        K = int(self.field(f"{arch}.attention.head_count_kv") or H)
        head_dim = int(self.field(f"{arch}.attention.key_length") or D // H)
        rot = int(self.field(f"{arch}.rope.dimension_count") or head_dim)
        if rot != head_dim:
            raise CheckpointError(f"{self.path}: {arch}.rope.dimension_count={rot}, expected the head dim "
                                  f"{head_dim} (partial rotary embeddings are not supported)")
        vocab = self.field(f"{arch}.vocab_size")
        if vocab is None:
            tokens = self.field("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else int(self.tensors["token_embd.weight"].shape[1])
        scaling = None
        stype = self.field(f"{arch}.rope.scaling.type")
        if stype not in (None, "none"):
            if stype != "linear":
                raise CheckpointError(f"{self.path}: {arch}.rope.scaling.type is {stype!r}, "
                                      "expected 'none' or 'linear'")
            scaling = {"rope_type": "linear", "factor": float(self.field(f"{arch}.rope.scaling.factor"))}
        fields = dict(
            vocab_size=int(vocab), hidden_size=D, intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")), num_heads=H, num_kv_heads=K, head_dim=head_dim,
            rms_norm_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
            max_position_embeddings=int(self.field(f"{arch}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in self.tensors,
            architecture=fam.architecture,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"),
        )
        fields.update(overrides)
        try:
            return LlamaConfig(**fields)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from e

    # ------------------------------------------------------------------ tensors
    def name_of(self, spec: ParamSpec, layer: int | None) -> str:
        return spec.gguf_name(layer)

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def describe(self, spec: ParamSpec, layer: int | None) -> str:
        return f"{self.path}: tensor {spec.gguf_name(layer)}"

    def read(self, spec: ParamSpec, layer: int | None, cfg: LlamaConfig) -> np.ndarray:
        """The tensor for ``spec`` (layer ``layer``) as float32 in the HF layout (``[out, in]``, the GGUF
        shape reversed; e.g. ``[H*hd, D]`` for ``attn_q``), Q/K un-permuted."""
        from gguf import quants

        name = spec.gguf_name(layer)
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has GGUF quant type {qtype}, "
                                  f"expected one of {', '.join(SUPPORTED_TYPES)}")
        shape = tuple(int(n) for n in reversed(t.shape))
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: tensor {name} ({qtype}) cannot be dequantised "
                                  f"({_one_line(e)})") from e
        if spec.rope_permuted and family(cfg.architecture).gguf_rope_permuted and w.shape == spec.source_shape(cfg):
            w = unpermute_rope(w, cfg.num_heads if spec.rope_permuted == "q" else cfg.num_kv_heads)
        return w
