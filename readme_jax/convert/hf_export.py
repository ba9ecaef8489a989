"""Export a dense model as an HF checkpoint directory: safetensors + config.json + tokenizer files.

The inverse of loading: every stacked ``[L, ...]`` parameter is split into per-layer tensors and linear
weights are transposed back to ``[out, in]`` (see param_mapping). The result loads in ``transformers``
with ``AutoModelForCausalLM.from_pretrained(OUT)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from readme_jax.atomic import atomic_dir
from readme_jax.convert.param_mapping import llama_params
from readme_jax.convert.safetensors_io import save_safetensors
from readme_jax.errors import CheckpointError
from readme_jax.model.config import LlamaConfig


def hf_tensors(model) -> dict[str, np.ndarray]:
    """HF name -> host array for every parameter of a dense Llama, in the model's param dtype: each stacked
    ``[L, in, out]`` weight becomes L tensors ``[out, in]`` (norms ``[L, D]`` -> L x ``[D]``; see param_mapping)."""
    cfg: LlamaConfig = model.config
    out = {}
    for spec in llama_params(cfg):
        group, name = spec.ours
        arr = np.asarray(getattr(getattr(model, group), name)[...])
        if spec.per_layer:
            for i in range(cfg.num_layers):
                out[spec.hf_name(i)] = arr[i].T if spec.transpose else arr[i]
        else:
            out[spec.hf_name()] = arr.T if spec.transpose else arr
    return out


def export_hf(model, out: str | os.PathLike, *, tokenizer=None, max_shard_bytes: int = 5 << 30,
              overwrite: bool = False) -> Path:
    """Write ``model`` (a dense Llama) and ``tokenizer`` to the HF directory ``out``, atomically."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, LlamaConfig) or not hasattr(model, "ffn") or not hasattr(model.ffn, "w_gate"):
        raise CheckpointError(f"{out}: HF export supports dense Llama models only, "
                              f"found {type(model).__name__}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(hf_tensors(model), tmp, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)
