"""``python -m readme_jax.train [--config FILE] [--run-dir DIR] [--stage NAME] [--plan] [key.sub=value ...]``.

Thin on purpose: parse the command line, join the processes of a multi-host job, call the pipeline.
With no arguments it runs the embedded default config (configs/default.yaml) into ``runs/default``.
``--plan`` instead compiles the train steps for the config's mesh and prints their memory plan
(:mod:`readme_jax.train.plan`).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None, *, hooks=None) -> int:
    """The CLI; ``hooks`` (a :class:`readme_jax.train.hooks.TrainHooks`) go to the trainer (tests inject faults)."""
    from readme_jax.train.stages import STAGE_NAMES
    parser = argparse.ArgumentParser(prog="python -m readme_jax.train",
                                     description="Read-ME: dense model -> statistics -> experts -> "
                                                 "alternating router/expert tuning -> evaluation -> export.")
    parser.add_argument("--config", help="YAML config (a path, or a name in configs/ e.g. 'tiny'); "
                                          "default: the embedded configs/default.yaml")
    parser.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--stage", choices=STAGE_NAMES, help="run only this stage")
    parser.add_argument("--plan", action="store_true",
                        help="print the train steps' memory and communication plan for the config's mesh "
                             "(compiled on simulated CPU devices; nothing is downloaded or trained)")
    parser.add_argument("--plan-devices", type=int, metavar="N",
                        help="--plan: simulated devices (default: the product of the mesh sizes)")
    parser.add_argument("--plan-out", metavar="FILE", help="--plan: the JSON (default <run_dir>/plan/<mesh>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.plan:
        return _plan(args)

    from readme_jax.parallel.distributed import initialize
    try:
        initialize()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from readme_jax.assets import enable_compilation_cache
    enable_compilation_cache()                          # persistent XLA cache: reruns skip compiles

    from readme_jax.config import load_config
    from readme_jax.errors import (CheckpointError, ConfigError, CorpusError, PipelineError, RunLockError,
                                   StaleRunError, TokenizerError, TrainingDivergedError)
    from readme_jax.train.pipeline import run_pipeline
    try:
        cfg = load_config(args.config, args.overrides)
        run_pipeline(cfg, args.run_dir, stage=args.stage, hooks=hooks)
    except (ConfigError, PipelineError, TrainingDivergedError, CorpusError, CheckpointError, RunLockError,
            StaleRunError, TokenizerError) as e:
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:      # the environment's faults: a full disk, a read-only folder, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {type(e).__name__}: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


def _simulate_devices(n: int) -> None:
    """Unless an accelerator platform is requested (JAX_PLATFORMS), run on ``n`` simulated CPU devices:
    set before jax starts its backends, which read XLA_FLAGS then (a process whose backends already run
    keeps its devices)."""
    if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def _plan(args) -> int:
    """``--plan``: the config's mesh on simulated devices, the plan of readme_jax.train.plan; 2 on a bad
    config or mesh (the message names the keys)."""
    import math
    from readme_jax.config import load_config
    from readme_jax.errors import ConfigError
    try:
        cfg = load_config(args.config, args.overrides)
        sizes = cfg.mesh.sizes()
        _simulate_devices(args.plan_devices or math.prod(v for v in sizes.values() if v != -1))
        from readme_jax.train.plan import run_plan
        return run_plan(cfg, args.run_dir, args.plan_out)
    except ConfigError as e:
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from readme_jax.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()                             # malloc on huge pages (readme_jax/hugepages.py)
    sys.exit(main())
