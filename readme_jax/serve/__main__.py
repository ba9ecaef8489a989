"""``python -m readme_jax.serve --model PATH [--host 127.0.0.1] [--port 8000] ...``: the OpenAI-compatible server.

``--model smollm2`` serves the pinned SmolLM2-135M-Instruct GGUF; any ``readme_jax.load_pretrained`` path works
(an HF directory, a GGUF, our dense checkpoint or a Read-ME export). SIGTERM drains in-flight requests for up
to ``--drain-timeout`` seconds, aborts the rest and exits 0. ``--mesh data=1,fsdp=8,expert=1`` serves on a
device mesh (params and slot caches sharded, ``serve/runner.py``; a size of -1 takes the devices left).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from readme_jax.model.dispatch import DISPATCHERS
from readme_jax.serve.expert_cache import POLICIES
from readme_jax.serve.schedulers import SCHEDULERS

DEFAULT_MAX_MODEL_LEN = 2048


def context_length(model) -> int:
    """The model's trained context (max_position_embeddings), for a dense or a Read-ME model."""
    config = model.config
    return int(getattr(config, "base", config).max_position_embeddings)


def parse_mesh(text: str) -> dict[str, int]:
    """``--mesh`` "data=2,fsdp=-1" -> {"data": 2, "fsdp": -1}: sizes of the axes of ``parallel.mesh.make_mesh``
    (an axis not named is 1); argparse.ArgumentTypeError naming the expected form otherwise."""
    from readme_jax.config.sections import MESH_AXES

    form = (f"expected NAME=SIZE[,NAME=SIZE...], NAME one of {', '.join(MESH_AXES)} (each at most once), SIZE an "
            f"integer >= 1 or -1 (the devices left; one axis at most), e.g. data=1,fsdp=8,expert=1; got {text!r}")
    sizes: dict[str, int] = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        try:
            size = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(form) from None
        if not eq or name not in MESH_AXES or name in sizes or not (size >= 1 or size == -1):
            raise argparse.ArgumentTypeError(form)
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise argparse.ArgumentTypeError(form)
    return sizes


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m readme_jax.serve", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF directory, .gguf file, or a readme_jax checkpoint; 'smollm2' = the pinned SmolLM2-135M")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="engine slots (sequences decoded together)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens per engine step")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help=f"context per request (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})")
    ap.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    ap.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    SCHEDULERS.add_cli(ap, "scheduler", "decode-first")
    ap.add_argument("--expert-slots", type=int, default=None,
                    help="Read-ME: resident experts per layer for decode (default: all); the rest in host memory")
    POLICIES.add_cli(ap, "expert-policy", "belady", prefix="policy-")
    DISPATCHERS.add_cli(ap, "dispatcher", None, prefix="dispatcher-")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1 routes")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    ap.add_argument("--mesh", type=parse_mesh, default=None,
                    help="serve on a device mesh, e.g. data=1,fsdp=8,expert=1 (-1: the devices left; "
                         "not with --expert-slots); default: one device")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from readme_jax.errors import ConfigError
    try:                                              # a registry name with options of another entry: one line
        scheduler, scheduler_options = SCHEDULERS.from_cli(args, "scheduler")
        policy, policy_options = POLICIES.from_cli(args, "expert-policy")
        dispatcher = None
        if args.dispatcher is not None:
            name, opts = DISPATCHERS.from_cli(args, "dispatcher")
            dispatcher = DISPATCHERS.make(name, **opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue", "default_max_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2

    import jax.numpy as jnp

    from readme_jax import assets
    from readme_jax.convert.load import load_pretrained
    from readme_jax.parallel.mesh import make_mesh
    from readme_jax.serve.engine import Engine, EngineConfig
    from readme_jax.serve.metrics import EngineMetrics
    from readme_jax.serve.server import create_app, serve

    path = assets.smollm2_gguf() if args.model == "smollm2" else Path(args.model)
    name = args.served_model_name or ("smollm2" if args.model == "smollm2" else
                                      (path.stem if path.suffix == ".gguf" else path.name))
    try:                                              # before loading: a mesh the devices cannot hold fails fast
        mesh = None if args.mesh is None else make_mesh(args.mesh)
    except ValueError as e:
        print(f"error: --mesh: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_pretrained(path, dtype=jnp.dtype(args.dtype))
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer found next to the model")
        max_model_len = args.max_model_len or min(context_length(model), DEFAULT_MAX_MODEL_LEN)
        if not 1 < max_model_len <= context_length(model):
            raise ValueError(f"--max-model-len must be in [2, {context_length(model)}] (the model's context), "
                             f"got {max_model_len}")
        cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           max_model_len=max_model_len, max_queue=args.max_queue,
                           default_max_tokens=args.default_max_tokens, scheduler=scheduler,
                           scheduler_options=tuple(scheduler_options.items()), expert_slots=args.expert_slots,
                           expert_policy=policy, expert_policy_options=tuple(policy_options.items()), mesh=mesh,
                           dispatcher=dispatcher)
        metrics = EngineMetrics()
        engine = Engine(model, tokenizer, cfg, metrics=metrics)
    except (ValueError, OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, tokenizer, model_name=name, max_model_len=max_model_len,
                     default_max_tokens=args.default_max_tokens, api_key=args.api_key, metrics=metrics)
    serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
