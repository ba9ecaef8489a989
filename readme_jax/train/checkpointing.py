"""Orbax checkpoints of the alternating rounds: one CheckpointManager per phase (``router_0``, ``expert_0``...).

Layout::

    <run_dir>/checkpoints/<phase>/<step>/params      trainable params of the phase (flat {path: array})
                                        /opt_state   optax state (flat {path: array})
                                        /meta        JSON: phase, round, step, steps, done, data iterator
                                                     state (grain, JSON), RNG key data, host metrics

Only the phase's *trainable* partition is stored (the router in a router phase, the backbone in an expert
phase): the other partition is, bitwise, the last completed phase of the other kind, so the model at any
point is ``extracted model <- last router params <- last backbone params``.

Pytrees are stored flat, keyed by their jax key paths (``.router.attn.wq``, ``[1][0].mu.router...``), and
restored into a template of the same structure: nothing depends on how orbax handles NNX or optax
containers, and a structure mismatch is an error naming the missing / extra keys.

Atomicity (orbax 0.12, local filesystem, verified by ``tests/test_train_steps.py``): a save is written into
``<phase>/<step>.orbax-checkpoint-tmp-*`` and renamed to ``<phase>/<step>`` only once every item is
finalised; ``all_steps()`` / ``latest_step()`` ignore tmp folders, so a crash mid-save leaves the previous
checkpoint as the latest. Old steps are deleted only after the new one is final (``max_to_keep``).

Asynchronous writes (``async_write=True``, ``train.async_checkpoint``): ``save`` returns once orbax holds the
arrays (they stay alive, so the next step cannot donate them into its outputs: that step allocates anew, ~one
copy of the saved state more while the write runs) and the files are written in a background thread. The
next ``save`` or ``wait()`` blocks until the previous write is final and raises its error, if it had one.
A kill mid-write leaves the tmp folder, never a half step. When to save: ``Cadence`` (every n steps and / or
every s seconds of training, ``train.checkpoint_every`` / ``train.checkpoint_seconds``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from readme_jax.errors import CheckpointError


def _key_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) or "_"


def flatten(tree) -> dict[str, Any]:
    """{path string: leaf} of a pytree (a flat dict orbax stores as is)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _key_str(path).replace("/", ".")
        if key in flat:
            raise CheckpointError(f"two leaves share the checkpoint key {key!r}")
        flat[key] = leaf
    return flat


def unflatten(template, flat: dict[str, Any], what: str):
    """Put the arrays of ``flat`` back into the structure of ``template`` (leaf dtypes must match)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [_key_str(p).replace("/", ".") for p, _ in leaves]
    missing, extra = sorted(set(keys) - set(flat)), sorted(set(flat) - set(keys))
    if missing or extra:
        raise CheckpointError(f"{what}: checkpoint does not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    out = []
    for key, (_, ref) in zip(keys, leaves):
        arr = flat[key]
        if tuple(np.shape(arr)) != tuple(np.shape(ref)):
            raise CheckpointError(f"{what}: {key} has shape {np.shape(arr)} in the checkpoint, "
                                  f"{np.shape(ref)} in the model")
        out.append(arr)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)


class PhaseCheckpoints:
    """Checkpoints of one phase (one CheckpointManager directory).

    ``max_to_keep`` steps are kept (default one; ``train.keep_checkpoints``, None: all, which ``science curve``
    evaluates): orbax finalises the new step before it deletes the old one, so a crash never leaves a phase
    without a complete checkpoint, and a 135M backbone with its Adam state is ~1.4 GB per step (tied experts)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 1, async_write: bool = False):
        self.directory = Path(directory).absolute()
        self.async_write = async_write
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_write),
            item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every kept step, ascending (``max_to_keep`` None keeps them all)."""
        return sorted(self.manager.all_steps())

    def meta(self, step: int | None = None) -> dict | None:
        """The JSON meta of ``step`` (default: latest), or None when there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def is_done(self) -> bool:
        m = self.meta()
        return bool(m and m.get("done"))

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Write one checkpoint, atomically; with ``async_write`` return before the files are written (the
        previous write is finished first). See the module docstring."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(flatten(params)),
            opt_state=ocp.args.StandardSave(flatten(opt_state)),
            meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)
        if not self.async_write:
            self.wait()

    def wait(self) -> None:
        """Block until the last save is final on disk; raises its error if the write failed."""
        self.manager.wait_until_finished()

    def restore(self, params_template, opt_template=None, step: int | None = None):
        """(params, opt_state or None, meta) of ``step`` (default latest), in the templates' structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        items = {"params": ocp.args.StandardRestore(flatten(params_template)),
                 "meta": ocp.args.JsonRestore()}
        if opt_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(flatten(opt_template))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({e})") from e
        params = unflatten(params_template, dict(out["params"]), f"{self.directory}/{step}/params")
        opt = None if opt_template is None else unflatten(opt_template, dict(out["opt_state"]),
                                                          f"{self.directory}/{step}/opt_state")
        return params, opt, dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


@dataclasses.dataclass
class Cadence:
    """When a phase checkpoints mid-way: every ``every_steps`` updates and / or once ``every_seconds`` have
    passed since the last save (or the phase's start); None turns a clock off. ``clock``: seconds (monotonic)."""

    every_steps: int | None
    every_seconds: float | None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self.last = self.clock()

    def due(self, step: int) -> bool:
        """Whether to save after update ``step`` (1-based)."""
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_seconds is not None and self.clock() - self.last >= self.every_seconds
        return by_steps or by_time

    def saved(self) -> None:
        self.last = self.clock()


def phase_done(directory: str | Path) -> bool:
    """Whether the phase checkpointed in ``directory`` finished (its latest checkpoint says ``done``); a
    missing folder is not done (and is not created)."""
    return Path(directory).is_dir() and PhaseCheckpoints(directory).is_done()


def remove_tmp_dirs(directory: str | Path) -> list[Path]:
    """Delete leftover ``*.orbax-checkpoint-tmp-*`` folders of an interrupted save; returns them."""
    removed = []
    for p in Path(directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
