"""``<run>/science/<experiment>/``: one experiment's folder, settings record, resumable parts and results.

    with Experiment(run_dir, "bounds", settings) as ex:     # locks the folder, checks / writes settings.json
        ppl = ex.part("oracle", lambda: evaluate(...))     # parts/oracle.json: computed once, reused on rerun
        ex.finish(result, table_md)                        # result.json + table.md (+ the PNGs it drew)

The folder follows the run-folder rules of ``python -m readme_jax.train``: one process at a time (a
:class:`~readme_jax.train.lock.RunLock`), every file written atomically, and a ``settings.json`` record of what
the results were made with (the experiment's settings section and the parent run's identity: its config name
and stage records). A rerun with other settings is refused naming the changed keys, because its parts would
mix two settings; a rerun with the same settings resumes from the parts already written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from readme_jax.atomic import atomic_write_json, atomic_write_text
from readme_jax.config import load_config
from readme_jax.errors import PipelineError, StaleRunError
from readme_jax.train.lock import RunLock
from readme_jax.train.records import RECORDS_FILE, changed_keys
from readme_jax.train.run import Run, say


def parent_run(run_dir: str | Path, *, progress: bool = True) -> Run:
    """The finished run a science experiment reuses (its ``config.yaml``); refuses an unfinished one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PipelineError(f"{run_dir}: not a run folder (no config.yaml); run python -m readme_jax.train "
                            f"--run-dir {run_dir} first")
    run = Run(load_config(run_dir / "config.yaml"), run_dir, progress=progress)
    if not run.phases_done() or not run.eval_path("final").is_file():
        raise PipelineError(f"{run_dir}: the run is not finished (rounds / final_eval); rerun "
                            f"python -m readme_jax.train --run-dir {run_dir}")
    return run


class Experiment:
    """One experiment's folder under ``<run>/science/<name>``; a context manager (see the module docstring)."""

    def __init__(self, run: Run, name: str, settings: dict[str, Any]):
        self.run, self.name = run, name
        self.dir = run.dir / "science" / name
        records = run.dir / RECORDS_FILE
        self.settings = {"experiment": name, "settings": settings, "parent": {
            "config": run.cfg.name, "stages": json.loads(records.read_text()) if records.is_file() else {}}}
        self._lock = RunLock(self.dir)

    def __enter__(self) -> "Experiment":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._check_settings()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _check_settings(self) -> None:
        path = self.dir / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())
            changed = changed_keys("", old, self.settings)
            if changed:
                raise StaleRunError(
                    f"{self.dir}: made with other settings ({', '.join(k.lstrip('.') for k in changed[:6])}); "
                    "its parts would mix two settings. Use the same settings, or delete the folder.")
        else:
            atomic_write_json(path, self.settings, indent=1)

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def part(self, name: str, compute: Callable[[], Any]) -> Any:
        """``parts/<name>.json`` if written by an earlier run with these settings, else ``compute()`` (JSON-able),
        written atomically before it is returned."""
        path = self.path("parts", f"{name}.json")
        if path.is_file():
            say(f"[{self.name}] {name}: reused {path}")
            return json.loads(path.read_text())
        value = compute()
        atomic_write_json(path, value, indent=1)
        return value

    def finish(self, result: dict[str, Any], table: str) -> None:
        """Write ``result.json`` and ``table.md`` and print the table."""
        atomic_write_json(self.path("result.json"), {"experiment": self.name, **result}, indent=1)
        atomic_write_text(self.path("table.md"), table + "\n")
        say(table)
        say(f"[{self.name}] -> {self.dir}")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant decimals unless already strings."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
