"""Our own checkpoint directory: orbax params + config.json (with a kind marker) + the tokenizer.

Layout of ``OUT/``::

    config.json    the model config's ``to_dict()`` plus {"readme_jax": {"kind": "dense", "version": 1}}
    params/        orbax StandardCheckpointer of the model's variables (``nnx.to_pure_dict`` tree): its params and
                   any index they need (a tied Read-ME's expert channels)
    tokenizer/     the tokenizer's own files (``Tokenizer.save``), when the model has one

The whole directory is written atomically (temp sibling + ``os.replace``). Other model kinds (the Read-ME
MoE) write the same layout with their own ``kind`` and config dict and register a loader for it in
:mod:`readme_jax.convert.load`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flax import nnx

from readme_jax.atomic import atomic_dir
from readme_jax.errors import CheckpointError

MARKER = "readme_jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def save_checkpoint(out: str | os.PathLike, model: nnx.Module, *, tokenizer=None, kind: str = "dense",
                    config: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s params, its config (default ``model.config.to_dict()``) and ``tokenizer`` to ``out``."""
    import orbax.checkpoint as ocp

    config = dict(model.config.to_dict() if config is None else config)
    config[MARKER] = {"kind": kind, "version": FORMAT_VERSION}
    params = nnx.to_pure_dict(nnx.state(model))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()      # orbax writes asynchronously: a failed write raises here
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
    return Path(out)


def remove_leftovers(folder: str | os.PathLike, name: str = "*", *, recursive: bool = False) -> list[Path]:
    """Delete what interrupted atomic writes (:mod:`readme_jax.atomic`) of ``name`` left in ``folder``: the
    ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings of the target (under ``folder`` at any depth when
    ``recursive``). Only for targets the caller owns (no other writer may be at work on them). Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        pattern = f".{name}.{kind}-*"
        for p in sorted(folder.rglob(pattern) if recursive else folder.glob(pattern)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def read_checkpoint_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """(kind, config dict without the marker) when ``path`` is a directory we wrote, else None."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    marker = config.pop(MARKER, None) if isinstance(config, dict) else None
    if marker is None:
        return None
    if not isinstance(marker, dict) or "kind" not in marker:
        raise CheckpointError(f"{cfg_path}: field {MARKER!r} is {marker!r}, expected "
                              '{"kind": ..., "version": ...}')
    if marker.get("version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: {MARKER}.version is {marker['version']}, "
                              f"expected <= {FORMAT_VERSION} (written by a newer readme_jax)")
    return marker["kind"], config


def restore_params(path: str | os.PathLike, abstract_model: nnx.Module) -> nnx.Module:
    """Fill the variables (params and indices) of an abstract model (``nnx.eval_shape``) from ``path/params``.

    Arrays are restored in the abstract model's dtypes (orbax casts), so the dtype chosen at load time wins.
    """
    import jax
    import orbax.checkpoint as ocp

    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing (expected the orbax params of the checkpoint)")
    graphdef, state = nnx.split(abstract_model)
    target = nnx.to_pure_dict(state)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])    # each process restores its own copy
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), target)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds (ValueError, KeyError, FileNotFoundError)
        raise CheckpointError(f"{params_dir}: cannot restore params ({' '.join(str(e).split())[:300]})") from e
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_tokenizer_dir(path: str | os.PathLike):
    """The tokenizer saved in ``path/tokenizer`` (None when absent)."""
    tok_dir = Path(path) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return None
    from readme_jax.data.tokenizers import load_tokenizer
    return load_tokenizer(tok_dir)
