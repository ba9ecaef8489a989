"""``python -m readme_jax.train [--config FILE] [--run-dir DIR] [--stage NAME] [key.sub=value ...]``.

Thin on purpose: parse the command line, join the processes of a multi-host job, call the pipeline.
With no arguments it runs the embedded default config (configs/default.yaml) into ``runs/default``.
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
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)

    import jax
    from readme_jax.parallel.distributed import initialize
    try:
        initialize()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("READMEJAX_JIT_CACHE", "1") != "0":   # persistent XLA cache: reruns skip compiles
        from readme_jax.assets import cache_dir
        jax.config.update("jax_compilation_cache_dir", str(cache_dir("jax_compilation_cache")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from readme_jax.config import load_config
    from readme_jax.data.sources import CorpusError
    from readme_jax.errors import CheckpointError, ConfigError
    from readme_jax.data.tokenizers import TokenizerError
    from readme_jax.train.lock import RunLockError
    from readme_jax.train.pipeline import run_pipeline
    from readme_jax.train.records import StaleRunError
    from readme_jax.train.run import PipelineError
    from readme_jax.train.steps import TrainingDivergedError
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


if __name__ == "__main__":
    sys.exit(main())
