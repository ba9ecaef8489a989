"""``python -m readme_jax.serve --model PATH [--host 127.0.0.1] [--port 8000] ...``: the OpenAI-compatible server.

``--model smollm2`` serves the pinned SmolLM2-135M-Instruct GGUF; any ``readme_jax.load_pretrained`` path works
(an HF directory, a GGUF, our dense checkpoint or a Read-ME export). SIGTERM drains in-flight requests for up
to ``--drain-timeout`` seconds, aborts the rest and exits 0. ``--mesh data=1,fsdp=8,expert=1`` serves on a
device mesh (params sharded, page pools replicated, ``serve/paged_runner.py``; a size of -1 takes the devices left).
The API key comes from ``--api-key``, ``--api-key-file`` or ``$READMEJAX_API_KEY`` (an empty key is refused);
``--max-body-bytes``, ``--header-timeout``, ``--body-timeout`` and ``--max-connections`` bound what one client
can hold (``serve/limits.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from readme_jax.model.dispatch import DISPATCHERS
from readme_jax.serve.expert_cache import POLICIES
from readme_jax.serve.schedulers import SCHEDULERS

DEFAULT_MAX_MODEL_LEN = 2048
API_KEY_ENV = "READMEJAX_API_KEY"


def api_key(args) -> str | None:
    """The key from --api-key, --api-key-file (first line) or $READMEJAX_API_KEY (at most one of the flags; an
    empty key is refused): None for a key-less server. ValueError naming the source otherwise."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file: cannot read {args.api_key_file} ({e})") from None
        key, source = (lines[0] if lines else ""), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif os.environ.get(API_KEY_ENV) is not None:
        key, source = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip():
        raise ValueError(f"{source}: the API key is empty (give a non-empty key, or none for a key-less server)")
    return key.strip()


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
    ap.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting beyond the free sequence slots before 429")
    ap.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    SCHEDULERS.add_cli(ap, "scheduler", "decode-first")
    ap.add_argument("--kv-cache-memory", default=None,
                    help="KV pages' memory: bytes (536870912, 512MiB, 2GB) or pages (4096pages); default: every "
                         "sequence at --max-model-len (no preemption)")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="turn off automatic prefix caching (on by default: prompts sharing full pages skip them)")
    ap.add_argument("--expert-slots", type=int, default=None,
                    help="Read-ME: resident experts per layer for decode (default: all); the rest in host memory")
    POLICIES.add_cli(ap, "expert-policy", "belady", prefix="policy-")
    DISPATCHERS.add_cli(ap, "dispatcher", None, prefix="dispatcher-")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    ap.add_argument("--api-key", default=None,
                    help=f"require 'Authorization: Bearer <key>' (visible to local users in the process list: "
                         f"prefer --api-key-file or ${API_KEY_ENV})")
    ap.add_argument("--api-key-file", type=Path, default=None, help="read the API key from this file's first line")
    ap.add_argument("--max-body-bytes", type=int, default=None,
                    help="larger request bodies get 413 (default: 64 prompts x max-model-len x 12 bytes + 64 KiB)")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection may take to send a request's headers before it is closed")
    ap.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request body may take to arrive (408)")
    ap.add_argument("--max-connections", type=int, default=512, help="open connections before uvicorn answers 503")
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
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue", "default_max_tokens", "page_size",
                 "max_connections", "header_timeout", "body_timeout") + (
                     ("max_body_bytes",) if args.max_body_bytes is not None else ()):
        if not getattr(args, name) > 0:
            print(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        key = api_key(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax.numpy as jnp

    from readme_jax import assets
    from readme_jax.convert.load import load_pretrained
    from readme_jax.parallel.mesh import make_mesh
    from readme_jax.serve.engine import Engine, EngineConfig
    from readme_jax.serve.engine_config import parse_kv_memory
    from readme_jax.serve.limits import Limits
    from readme_jax.serve.metrics import EngineMetrics
    from readme_jax.serve.protocol import MAX_CHOICES
    from readme_jax.serve.server import create_app, serve

    assets.enable_compilation_cache()     # a restarted server loads its compiled buckets instead of compiling them
    path = assets.smollm2_gguf() if args.model == "smollm2" else Path(args.model)
    name = args.served_model_name or ("smollm2" if args.model == "smollm2" else
                                      (path.stem if path.suffix == ".gguf" else path.name))
    try:                                              # before loading: a bad size fails fast
        if args.kv_cache_memory is not None:
            parse_kv_memory(args.kv_cache_memory)
    except ConfigError as e:
        print(f"error: --kv-cache-memory: {e}", file=sys.stderr)
        return 2
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
                           dispatcher=dispatcher, page_size=args.page_size, kv_cache_memory=args.kv_cache_memory,
                           prefix_caching=not args.no_prefix_caching)
        metrics = EngineMetrics(model_name=name)
        engine = Engine(model, tokenizer, cfg, metrics=metrics)
    except (ValueError, OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits.for_context(max_model_len, MAX_CHOICES, body_timeout_s=args.body_timeout,
                                header_timeout_s=args.header_timeout, max_connections=args.max_connections)
    if args.max_body_bytes is not None:
        limits = dataclasses.replace(limits, max_body_bytes=args.max_body_bytes)
    app = create_app(engine, tokenizer, model_name=name, max_model_len=max_model_len,
                     default_max_tokens=args.default_max_tokens, api_key=key, metrics=metrics, limits=limits)
    serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
