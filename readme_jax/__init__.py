"""readme_jax: Read-ME (NeurIPS 2024) in JAX/Flax.

    import readme_jax
    model, tokenizer = readme_jax.load_pretrained(path)            # HF dir, .gguf, or our checkpoint
    texts = readme_jax.generate(model, tokenizer, prompts, max_new_tokens=32)

Both names are imported lazily, so ``import readme_jax`` stays light (no jax import).
"""

_LAZY = {
    "load_pretrained": "readme_jax.convert.load",
    "generate": "readme_jax.generation",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
