"""``load_pretrained``: one entry point for every checkpoint kind, detected from the path.

    model, tokenizer = load_pretrained(path, dtype=jnp.float32, **config_overrides)

``path`` may be
  * an HF directory (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``),
  * a ``.gguf`` file (or a directory holding exactly one and no config.json),
  * a directory written by ``python -m readme_jax.convert`` / the training pipeline (``config.json`` carries a
    ``"readme_jax": {"kind": ...}`` marker), loaded by the loader of its kind in ``LOADERS`` ("dense" here,
    "readme" in convert/readme_checkpoint.py); :func:`register_loader` adds a kind.
Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) are refused: they can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp

from readme_jax.convert import checkpoint
from readme_jax.convert.config_check import check_hf_config, check_llama_dict
from readme_jax.convert.readme_checkpoint import load_readme_checkpoint
from readme_jax.errors import CheckpointError
from readme_jax.model.config import LlamaConfig

#: loader(path, config_dict, *, dtype, **config_overrides) -> model
Loader = Callable[..., Any]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def register_loader(kind: str, fn: Loader) -> None:
    """Register ``fn(path, config_dict, *, dtype, **config_overrides) -> model`` for checkpoints of ``kind``.

    ``path`` is the checkpoint directory, ``config_dict`` its config.json without the ``readme_jax`` marker;
    ``dtype`` is None (keep the stored dtype) or the dtype to cast params and compute to. The tokenizer is
    loaded by :func:`load_pretrained` itself (``path/tokenizer``).
    """
    LOADERS[kind] = fn


def _loader_for(kind: str, where: Path) -> Loader:
    if kind not in LOADERS:
        raise CheckpointError(f"{where}: readme_jax.kind is {kind!r}, expected one of {sorted(LOADERS)}")
    return LOADERS[kind]


def _with_dtype(cfg: LlamaConfig, dtype, overrides: dict) -> LlamaConfig:
    if dtype is not None:
        name = jnp.dtype(dtype).name
        overrides = {"dtype": name, "param_dtype": name, **overrides}
    return cfg.replace(**overrides) if overrides else cfg


def _refuse_pickle(path: Path):
    raise CheckpointError(f"{path}: refusing to unpickle a PyTorch checkpoint (it can run arbitrary code); "
                          "convert to safetensors first")


# ---------------------------------------------------------------------------------------------- loaders
def load_hf(directory: str | os.PathLike, dtype=jnp.float32, **overrides):
    """An HF safetensors directory -> (Llama, tokenizer or None)."""
    from readme_jax.convert.assemble import build_llama
    from readme_jax.convert.safetensors_io import INDEX_FILE, SafetensorsSource

    directory = Path(directory)
    cfg_path = directory / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: no config.json (expected an HF model directory)") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    check_hf_config(hf, source=str(cfg_path))
    cfg = _with_dtype(LlamaConfig.from_hf(hf, source=str(cfg_path)), dtype or jnp.float32, overrides)
    if not (directory / INDEX_FILE).is_file() and not any(directory.glob("*.safetensors")):
        pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(pickles[0])
    with SafetensorsSource(directory) as source:
        model = build_llama(source, cfg, str(directory))
    return model, _hf_tokenizer(directory)


def _hf_tokenizer(directory: Path):
    from readme_jax.data.tokenizers import load_tokenizer
    return load_tokenizer(directory)


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, **overrides):
    """A GGUF file -> (Llama, tokenizer from its metadata or None)."""
    from readme_jax.convert.assemble import build_llama
    from readme_jax.convert.gguf_io import GGUFSource

    source = GGUFSource(path)
    cfg = _with_dtype(source.config(), dtype or jnp.float32, overrides)
    model = build_llama(source, cfg, str(path))
    tokenizer = None
    if source.field("tokenizer.ggml.tokens") is not None:
        from readme_jax.data.tokenizers import tokenizer_from_gguf
        tokenizer = tokenizer_from_gguf(source.reader)
    return model, tokenizer


def _load_dense_checkpoint(path: Path, config: dict, *, dtype=None, **overrides):
    from readme_jax.convert.assemble import abstract_llama

    check_llama_dict(config, source=str(path / checkpoint.CONFIG_FILE))
    try:
        cfg = LlamaConfig.from_dict(config)
    except TypeError as e:
        raise CheckpointError(f"{path / checkpoint.CONFIG_FILE}: not a dense LlamaConfig ({e})") from e
    return checkpoint.restore_params(path, abstract_llama(_with_dtype(cfg, dtype, overrides)))


#: The checkpoint kinds of this project and their loaders (register_loader adds one).
LOADERS: dict[str, Loader] = {"dense": _load_dense_checkpoint, "readme": load_readme_checkpoint}


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, **config_overrides):
    """Load any supported checkpoint (see the module doc) -> (model, tokenizer or None).

    ``dtype`` sets both the parameter and the compute dtype (None keeps the stored dtype of our own
    checkpoints, float32 otherwise); ``config_overrides`` replace config fields (e.g. ``scan_layers=False``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected an HF directory, a .gguf file "
                              "or a readme_jax checkpoint directory)")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype, **config_overrides)
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix == ".safetensors" or path.name == "config.json":
            return load_hf(path.parent, dtype, **config_overrides)
        raise CheckpointError(f"{path}: unrecognised file type {path.suffix!r} (expected a .gguf file or a "
                              "directory)")
    ours = checkpoint.read_checkpoint_config(path)
    if ours is not None:
        kind, config = ours
        model = _loader_for(kind, path)(path, config, dtype=dtype, **config_overrides)
        return model, checkpoint.load_tokenizer_dir(path)
    if (path / "config.json").is_file():
        return load_hf(path, dtype, **config_overrides)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype, **config_overrides)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{path}: no config.json and no single .gguf file (expected an HF directory, a .gguf "
                          "file or a readme_jax checkpoint directory)")
