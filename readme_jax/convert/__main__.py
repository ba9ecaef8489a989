"""``python -m readme_jax.convert SRC OUT [--to-hf] [--dtype bfloat16]``

Convert SRC (an HF safetensors directory, a .gguf file, or a readme_jax checkpoint) into OUT: our own
checkpoint directory (orbax params + config.json + tokenizer) by default, or an HF directory with
``--to-hf``. OUT is written atomically (leftovers of an interrupted earlier write to OUT are removed first); on any
error, a full disk included, the command prints one line naming the file and exits 1. Source tensors the
model does not use are named in a warning.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readme_jax.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("src", help="HF directory, .gguf file or readme_jax checkpoint directory")
    parser.add_argument("out", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--to-hf", action="store_true", help="write an HF safetensors directory instead")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="parameter and compute dtype of the output (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    from pathlib import Path

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out}: already exists (pass --overwrite to replace it)")
        from readme_jax.convert.checkpoint import remove_leftovers
        from readme_jax.convert.load import load_pretrained

        for p in remove_leftovers(out.absolute().parent, out.name):   # of an interrupted earlier convert to OUT
            print(f"removed {p} (left by an interrupted write)", file=sys.stderr)

        model, tokenizer = load_pretrained(args.src, dtype=args.dtype)
        if args.to_hf:
            from readme_jax.convert.hf_export import export_hf
            export_hf(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
        else:
            from readme_jax.convert.checkpoint import save_checkpoint
            save_checkpoint(out, model, tokenizer=tokenizer, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, TokenizerError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    import jax
    from flax import nnx

    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"wrote {out} ({'HF safetensors' if args.to_hf else 'readme_jax checkpoint'}, "
          f"{n:,} params, {args.dtype}, tokenizer: {'yes' if tokenizer is not None else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
