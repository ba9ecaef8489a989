"""``<run_dir>/tensorboard/``: the run's metrics as TensorBoard event files (tensorboardX), next to
``metrics.jsonl``, which stays the record the pipeline reads back.

    tensorboard --logdir runs/default/tensorboard

Scalars, from each record :class:`~readme_jax.train.metrics_log.MetricsLog` writes:
  step   ``<phase>/<field>`` at the phase's step (loss, nll, lr, grad_norm, tokens_per_s, tflops, mfu, ...)
  eval   ``eval/ppl_<domain>``, ``eval/router_accuracy``, ``eval/locality`` at the expert-tuning steps done when
         the evaluated model was taken (router_0: 0; final: all), so they draw a curve; the dense parent's
         as ``dense/ppl_<domain>`` (step 0)
  stage  ``stage_seconds/<stage>``
The event file is opened at the first record (a folder only read, e.g. a science parent, gets none), shared
by every mirror of that folder in the process (the pipeline builds a ``Run`` per stage in science variants: one
event file per folder and process, not per ``Run``), and each record is written and flushed synchronously
(tensorboardX's ``EventsWriter``: its ``SummaryWriter`` queues events for a background thread, so a record
could still be in memory when a run is killed; here a few records a minute).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from readme_jax.config import Config


@functools.cache
def _writer(directory: Path):
    from tensorboardX.event_file_writer import EventsWriter
    directory.mkdir(parents=True, exist_ok=True)
    return EventsWriter(str(directory / "events"))


def expert_steps_before(cfg: Config, tag: str) -> int:
    """Expert-tuning steps done when the model of evaluation ``tag`` was taken (dense / router_r / expert_r /
    final)."""
    t = cfg.train
    if tag == "final":
        return t.rounds * t.expert_steps
    kind, _, r = tag.rpartition("_")
    if kind == "expert" and r.isdigit():
        return (int(r) + 1) * t.expert_steps
    if kind == "router" and r.isdigit():
        return int(r) * t.expert_steps
    return 0


class TensorBoardMirror:
    """A callable that writes one metrics record's scalars to ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | Path, cfg: Config):
        self.directory, self.cfg = Path(directory).absolute(), cfg

    def __call__(self, record: dict) -> None:
        scalars = self.scalars(record)
        if not scalars:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        writer, now = _writer(self.directory), time.time()
        for tag, value, step in scalars:
            writer.write_event(Event(wall_time=now, step=step,
                                     summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))
        writer.flush()

    def scalars(self, record: dict) -> list[tuple[str, float, int]]:
        """[(tag, value, step)] of one record."""
        event = record.get("event")
        if event == "step":
            return [(f"{record['phase']}/{k}", float(v), int(record["step"])) for k, v in record.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "round")]
        if event == "eval":
            x = expert_steps_before(self.cfg, record["tag"])
            group = "dense" if record["tag"] == "dense" else "eval"
            out = [(f"{group}/ppl_{d}", float(v["ppl"]), x) for d, v in record.get("ppl", {}).items()]
            return out + [(f"eval/{k}", float(record[k]), x) for k in ("router_accuracy", "locality") if k in record]
        if event == "stage":
            return [(f"stage_seconds/{record['stage']}", float(record["seconds"]), 0)]
        return []
