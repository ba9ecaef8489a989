"""Model specs of the evaluation CLIs: ``[LABEL=]SOURCE[@DTYPE]``, SOURCE being ``smollm2`` (the pinned
SmolLM2-135M-Instruct GGUF, fetched once) or anything ``load_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path


def load_model(spec: str, dtype: str | None = None):
    """``(source, model, tokenizer)`` of ``smollm2`` (the pinned SmolLM2 GGUF) or anything load_pretrained loads."""
    import jax.numpy as jnp
    from readme_jax import assets
    from readme_jax.convert.load import load_pretrained
    source = assets.smollm2_gguf() if spec == "smollm2" else Path(spec)
    if not Path(source).exists():
        raise ValueError(f"{spec}: no such model file or folder")
    model, tokenizer = load_pretrained(source, dtype=jnp.dtype(dtype) if dtype else jnp.float32)
    return str(source), model, tokenizer


def parse_model(arg: str) -> tuple[str, str, str | None]:
    """``[LABEL=]SPEC[@DTYPE]`` -> (label, spec, dtype)."""
    label, _, rest = arg.rpartition("=") if "=" in arg else ("", "", arg)
    spec, _, dtype = rest.partition("@")
    if not spec:
        raise ValueError(f"--model {arg!r}: expected [LABEL=]PATH[@DTYPE]")
    if dtype and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--model {arg!r}: dtype {dtype!r} is not float32, bfloat16 or float16")
    return label or (spec + (f"@{dtype}" if dtype else "")), spec, dtype or None
