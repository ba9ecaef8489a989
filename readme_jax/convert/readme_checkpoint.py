"""Read-ME checkpoints: the common layout of ``readme_jax.convert.checkpoint`` with kind "readme".

    save_readme(model, out, tokenizer)            # orbax params + config.json {"readme_jax": {"kind": "readme"}}
    model, tokenizer = readme_jax.load_pretrained(out)     # dispatches to load_readme_checkpoint (convert/load.py)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from readme_jax.convert.checkpoint import restore_params, save_checkpoint
from readme_jax.convert.config_check import check_readme_dict
from readme_jax.errors import CheckpointError
from readme_jax.model.readme import ReadMe, ReadMeConfig

CHECKPOINT_KIND = "readme"


def save_readme(model: ReadMe, out: str | os.PathLike, tokenizer=None, *, overwrite: bool = False):
    """Write ``model`` (orbax params + config.json with {"readme_jax": {"kind": "readme", "version": 1}})
    and ``tokenizer`` to the directory ``out``, atomically. Returns the path. Tied experts are written as
    they are (channel tables + each expert's channels, ``"tied": true`` in config.json): the serving runner's
    masked kernel reads the tables; every other path gathers the per-expert layout from them."""
    return save_checkpoint(out, model, tokenizer=tokenizer, kind=CHECKPOINT_KIND,
                           config={**model.config.to_dict(), "tied": model.tied}, overwrite=overwrite)


def load_readme_checkpoint(path: str | os.PathLike, config: dict[str, Any], *, dtype=None,
                           **overrides) -> ReadMe:
    """The loader of kind "readme" in ``readme_jax.convert.load``'s table of kinds.

    ``config``: the checkpoint's config dict; ``dtype``: None (as saved) or the param and compute dtype of
    the backbone and router; ``overrides``: fields of the base LlamaConfig (e.g. ``scan_layers=False``).
    """
    check_readme_dict(config, source=f"{path}/config.json")
    try:
        cfg = ReadMeConfig.from_dict(config)
        if dtype is not None:
            name = jnp.dtype(dtype).name
            overrides = {"dtype": name, "param_dtype": name, **overrides}
            cfg = cfg.replace(router=dataclasses.replace(cfg.router, dtype=name, param_dtype=name))
        if overrides:
            cfg = cfg.replace(base=cfg.base.replace(**overrides))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: invalid Read-ME config ({e})") from e
    tied = bool(config.get("tied", False))              # absent: written before tied exports (fused)
    abstract = nnx.eval_shape(lambda: ReadMe(cfg, rngs=nnx.Rngs(0), tied=tied))
    return restore_params(path, abstract)
