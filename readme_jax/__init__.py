"""readme_jax: Read-ME (NeurIPS 2024) in JAX/Flax.

    import readme_jax
    model, tokenizer = readme_jax.load_pretrained(path)            # HF dir, .gguf, or our checkpoint
    texts = readme_jax.generate(model, tokenizer, prompts, max_new_tokens=32)

Both names are imported lazily, so ``import readme_jax`` stays light (no jax import).
"""

from readme_jax.lazy import lazy_getattr

_LAZY = {
    "load_pretrained": "readme_jax.convert.load",
    "generate": "readme_jax.generation",
}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
