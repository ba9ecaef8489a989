"""HF safetensors on disk: lazy reads one tensor at a time (single file or sharded index), and writes.

Reading goes through ``safetensors.safe_open`` (memory-mapped, never unpickles); a truncated file is
detected when it is opened, because its header promises more bytes than the file holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from readme_jax.convert.param_mapping import ParamSpec
from readme_jax.errors import CheckpointError
from readme_jax.model.config import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class SafetensorsSource:
    """The tensors of an HF checkpoint directory, read lazily.

    ``directory`` holds ``model.safetensors.index.json`` (its ``weight_map`` names the shard of every
    tensor), or one or more ``*.safetensors`` files. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        self._stack = contextlib.ExitStack()
        self._where: dict[str, str] = {}   # tensor name -> file name (relative to directory)
        self._handles: dict[str, object] = {}
        index = self.directory / INDEX_FILE
        self.label = str(index)  # what error messages name for a tensor that is absent
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index "
                                      f"(expected JSON with a 'weight_map' object; {_one_line(e)})") from e
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}")
            weight_map = None
            self.label = str(self.directory / files[0]) if len(files) == 1 else str(self.directory)
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {fname} is missing (expected {path})")
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
                self.close()
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({_one_line(e)})") from e
            self._handles[fname] = handle
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == fname:
                    self._where.setdefault(key, fname)
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._where:
                    raise CheckpointError(f"{self.directory / fname}: tensor {key} is listed in {INDEX_FILE} "
                                          "but missing from the shard")

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        """The file a tensor comes from (or the directory when it is absent), for error messages."""
        fname = self._where.get(name)
        return str(self.directory / fname) if fname else self.label

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def name_of(self, spec: ParamSpec, layer: int | None) -> str:
        return spec.hf_name(layer)

    def tensor_names(self) -> list[str]:
        return self.keys()

    def describe(self, spec: ParamSpec, layer: int | None) -> str:
        name = spec.hf_name(layer)
        return f"{self.file_of(name)}: tensor {name}"

    def read(self, spec: ParamSpec, layer: int | None, cfg: LlamaConfig) -> np.ndarray:
        """The tensor for ``spec`` (layer ``layer``) in the HF layout (``[out, in]`` for linear weights, e.g.
        ``[F, D]`` for ``gate_proj``) and its stored dtype."""
        return self.get(spec.hf_name(layer))

    def get(self, name: str) -> np.ndarray:
        """One tensor as a host numpy array (its stored dtype)."""
        if name not in self._where:
            raise CheckpointError(f"{self.label}: tensor {name} is missing")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} cannot be read ({_one_line(e)})") from e


def save_safetensors(tensors: dict[str, np.ndarray], directory: str | os.PathLike,
                     max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write ``tensors`` (HF name -> array of any shape, e.g. ``[out, in]``) as ``model.safetensors``, or as
    shards plus an index when larger than ``max_shard_bytes``. Returns the written file names."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(arr)
        size += arr.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]
