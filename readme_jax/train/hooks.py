"""Callbacks the trainer calls at fixed points of a phase: how faults are injected, with no test code in the loop.

    run_pipeline(cfg, run_dir, hooks=MyHooks())          # or Trainer(..., hooks=MyHooks())

:class:`TrainHooks` is the no-op default; a subclass overrides what it needs. The tests use it to kill
the process right after an update (a real ``os._exit``, then the normal CLI resumes), to make one update
diverge (an infinite learning-rate scale), and to make a checkpoint write fail (e.g. raise
``OSError(errno.ENOSPC)`` as a full disk would).

Call points, per update ``step`` (1-based) of phase ``phase`` (``"router_0"``, ``"expert_1"``, ...):

1. ``lr_scale(phase, step)`` before the update: its peak learning rate is multiplied by the result;
2. ``before_checkpoint(phase, step)`` right before that step's checkpoint is written (when one falls there);
3. ``on_step(phase, step)`` after the update, its metrics record and its checkpoint.
"""

from __future__ import annotations


class TrainHooks:
    """No-op hooks (the default): every update runs at its scheduled learning rate, nothing else happens."""

    def lr_scale(self, phase: str, step: int) -> float:
        return 1.0

    def before_checkpoint(self, phase: str, step: int) -> None:
        pass

    def on_step(self, phase: str, step: int) -> None:
        pass
