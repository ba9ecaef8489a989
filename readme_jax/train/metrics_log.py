"""``<run_dir>/metrics.jsonl``: the append-only log of step / eval / stage records of a run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from readme_jax.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSONL of step / eval / stage records (``<run_dir>/metrics.jsonl``); one JSON object a line,
    each appended and fsynced (a kill mid-write tears at most the last line, which :meth:`records` skips).
    ``mirror(record)``, when given, is called after each write (the run's TensorBoard event files)."""

    def __init__(self, path: str | Path, *, enabled: bool = True, mirror: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.mirror = mirror

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.mirror is not None:
            self.mirror(record)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
        return out

    def drop(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrite the log without the records matching ``predicate`` (atomically)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.records() if not predicate(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
