"""``train.profile_steps``: a ``jax.profiler`` trace of a few updates, after the one that compiles.

    profiler = Profiler(run_dir / "profile" / phase, steps=3, first=start)
    for step in ...: profiler.before(step); out = update(...); profiler.after(step, out)
    profiler.stop()

The trace (TensorBoard / Perfetto format) covers updates ``first + 1 .. first + steps`` (0-based loop steps),
so the first update's compile is not in it; ``after`` waits for the traced update's outputs before the
trace stops, so the last step's device work is inside it.
"""

from __future__ import annotations

from pathlib import Path

import jax


class Profiler:
    def __init__(self, folder: str | Path, steps: int, *, first: int):
        self.folder, self.steps, self.begin = Path(folder), int(steps), first + 1
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.begin and not self.active:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.begin + self.steps - 1:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
