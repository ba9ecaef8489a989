"""``python -m readme_jax.generate --model PATH "prompt" ["prompt" ...]``: batched text generation."""

from __future__ import annotations

import argparse
import sys
import types


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m readme_jax.generate", description=__doc__)
    ap.add_argument("--model", required=True,
                    help="HF directory, .gguf file, or a readme_jax checkpoint; 'smollm2' = the pinned SmolLM2-135M")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    from readme_jax.errors import SamplingError
    from readme_jax.sampling import validate_sampling

    try:  # before the model loads: a bad value costs nothing
        validate_sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                          seed=args.seed)
    except SamplingError as e:
        flag = {"max_tokens": "max-new-tokens", "top_p": "top-p"}.get(e.param, e.param)
        print(f"error: {e} (option --{flag})", file=sys.stderr)
        return 2

    import jax.numpy as jnp

    from readme_jax import assets
    from readme_jax.convert.load import load_pretrained
    from readme_jax.generation import generate

    path = assets.smollm2_gguf() if args.model == "smollm2" else args.model
    try:
        model, tokenizer = load_pretrained(path, dtype=jnp.dtype(args.dtype))
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer found next to the model")
        outs = generate(model, tokenizer, args.prompts, args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, chat=args.chat)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompts, outs):
        print(f"{prompt}{out}" if not args.chat else out)
        print("-" * 40)
    return 0


class _CallableModule(types.ModuleType):
    """``readme_jax.generate`` names both this CLI module (``python -m readme_jax.generate``) and the public
    function ``readme_jax.generate(model, tokenizer, prompts, ...)``. Once the module is imported, Python binds
    the package attribute to it, so the module forwards calls to the function: both contracts hold in any
    import order."""

    def __call__(self, *args, **kwargs):
        from readme_jax.generation import generate
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
