"""``python -m readme_jax.science EXPERIMENT [--run-dir runs/default] [--settings configs/science/default.yaml] [k=v ...]``

Runs one experiment (or ``all``, in the registration order of ``readme_jax.science.EXPERIMENTS``) on a
finished run folder of ``python -m readme_jax.train``; each writes ``<run>/science/<experiment>/`` and prints
its table. Rerunning resumes (finished parts are reused); other settings on an existing folder are refused.
Bad input exits 2 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from readme_jax.science import EXPERIMENTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m readme_jax.science", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", choices=(*EXPERIMENTS.names(), "all"), help=EXPERIMENTS.help())
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"),
                        help="a finished run folder of python -m readme_jax.train (default runs/default)")
    parser.add_argument("--settings", type=Path, help="YAML of experiment budgets (default: configs/science/default.yaml "
                                                       "values, embedded)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)

    from readme_jax.errors import ConfigError, PipelineError, RunLockError, StaleRunError
    from readme_jax.science.folder import parent_run
    from readme_jax.science.settings import load_settings
    try:
        s = load_settings(args.settings, args.overrides)
        parent = parent_run(args.run_dir, progress=not args.no_progress)
        for name in EXPERIMENTS.names() if args.experiment == "all" else (args.experiment,):
            EXPERIMENTS.entry(name).cls(parent, getattr(s, name), progress=not args.no_progress)
    except (ConfigError, PipelineError, StaleRunError, RunLockError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from readme_jax.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()                             # malloc on huge pages, as the train CLI
    sys.exit(main())
