"""Fault injection for the training tests: :class:`readme_jax.train.hooks.TrainHooks` that kill the process,
make an update diverge or make a checkpoint write fail, and a driver that runs the real CLI with them.

    python -m tests.faults [--exit-at PHASE:STEP] [--nan-at PHASE:STEP] [--disk-full-at PHASE:STEP] [--hold-at
        PHASE:STEP] -- --config tiny --run-dir DIR

``--exit-at expert_0:3`` hard-exits (``os._exit``, no cleanup, like a kill) with :data:`EXIT_CODE` right after
update 3 of phase ``expert_0`` and its checkpoint; ``--nan-at expert_1:3`` runs that update at an infinite
learning rate, so it diverges and the run stops with ``TrainingDivergedError`` (exit 2, as the CLI reports it);
``--disk-full-at router_1:4`` makes that step's checkpoint write fail with ``OSError(ENOSPC)``; ``--hold-at
router_0:1`` pauses after that update until the file ``<run dir>/.release`` exists (a second process can then
try the same folder while this one holds it), printing ``HOLDING`` once it waits.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from readme_jax.train.hooks import TrainHooks

EXIT_CODE = 75


def _point(spec: str | None) -> tuple[str, int] | None:
    if spec is None:
        return None
    phase, _, step = spec.rpartition(":")
    return phase, int(step)


class Faults(TrainHooks):
    """Kill after update ``exit_at``, diverge at update ``nan_at``, fail the checkpoint write of ``disk_full_at``
    with ``OSError(ENOSPC)``; each a ``(phase, step)`` or None."""

    def __init__(self, *, exit_at=None, nan_at=None, disk_full_at=None, hold_at=None, release=None):
        self.exit_at, self.nan_at, self.disk_full_at = exit_at, nan_at, disk_full_at
        self.hold_at, self.release = hold_at, release

    def lr_scale(self, phase: str, step: int) -> float:
        return float("inf") if (phase, step) == self.nan_at else 1.0

    def before_checkpoint(self, phase: str, step: int) -> None:
        if (phase, step) == self.disk_full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"checkpoints/{phase}/{step}")

    def on_step(self, phase: str, step: int) -> None:
        if (phase, step) == self.exit_at:
            os._exit(EXIT_CODE)
        if (phase, step) == self.hold_at:
            print("HOLDING", flush=True)
            while not os.path.exists(self.release):
                time.sleep(0.05)


def main(argv: list[str]) -> int:
    import argparse

    from readme_jax.train.__main__ import main as train_main
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m tests.faults")
    ap.add_argument("--exit-at")
    ap.add_argument("--nan-at")
    ap.add_argument("--disk-full-at")
    ap.add_argument("--hold-at")
    args = ap.parse_args(argv[:split])
    rest = argv[split + 1:]
    run_dir = rest[rest.index("--run-dir") + 1] if "--run-dir" in rest else "."
    hooks = Faults(exit_at=_point(args.exit_at), nan_at=_point(args.nan_at), disk_full_at=_point(args.disk_full_at),
                   hold_at=_point(args.hold_at), release=os.path.join(run_dir, ".release"))
    return train_main(argv[split + 1:], hooks=hooks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
