"""Checkpoint conversion: HF safetensors / GGUF -> Flax, our orbax checkpoints, and export back to HF.

    from readme_jax.convert import load_pretrained, save_checkpoint, export_hf  # functions
    model, tokenizer = load_pretrained("path/to/hf_dir_or.gguf")

CLI: ``python -m readme_jax.convert SRC OUT [--to-hf] [--dtype bfloat16]``. Submodules are imported lazily;
errors are :class:`readme_jax.errors.CheckpointError`.
"""

from readme_jax.lazy import lazy_getattr

_LAZY = {
    "load_pretrained": "readme_jax.convert.load",
    "register_loader": "readme_jax.convert.load",
    "save_checkpoint": "readme_jax.convert.checkpoint",
    "export_hf": "readme_jax.convert.hf_export",
}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
