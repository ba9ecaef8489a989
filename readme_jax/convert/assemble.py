"""Build a dense :class:`Llama` from per-layer source tensors without ever random-initialising it.

The model is created abstractly (``nnx.eval_shape``); each stacked parameter is filled on the host, one
source tensor at a time, into a numpy buffer of the target dtype, then moved to the device once.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.convert.param_mapping import ParamSpec, llama_params
from readme_jax.errors import CheckpointError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama


class ParamReader(Protocol):
    """A checkpoint that yields each parameter in the HF layout (see param_mapping)."""

    def read(self, spec: ParamSpec, layer: int | None, cfg: LlamaConfig) -> np.ndarray:
        """One tensor in the HF layout, ``spec.source_shape(cfg)`` (e.g. ``[F, D]`` for ``w_gate``)."""

    def describe(self, spec: ParamSpec, layer: int | None) -> str: ...

    def name_of(self, spec: ParamSpec, layer: int | None) -> str:
        """The source's own name of the tensor ``spec`` reads (e.g. ``model.layers.0.mlp.gate_proj.weight``)."""

    def tensor_names(self) -> list[str]:
        """Every tensor the source holds."""


class UnusedTensorsWarning(UserWarning):
    """The source holds tensors the model does not read (the message names them and the source)."""


def abstract_llama(cfg: LlamaConfig) -> Llama:
    """A Llama whose parameters are ``jax.ShapeDtypeStruct`` s (no memory, no random numbers)."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _read_checked(reader: ParamReader, spec: ParamSpec, layer: int | None, cfg: LlamaConfig) -> np.ndarray:
    w = reader.read(spec, layer, cfg)
    want = spec.source_shape(cfg)
    if tuple(w.shape) != want:
        raise CheckpointError(f"{reader.describe(spec, layer)} has shape {_fmt(w.shape)}, "
                              f"expected {_fmt(want)} from the config")
    return w.T if spec.transpose else w


def host_params(reader: ParamReader, cfg: LlamaConfig) -> dict:
    """Every parameter as a host numpy array in our layout and ``cfg.param_dtype``, as a nested dict
    matching ``nnx.to_pure_dict`` of the model's params (e.g. ``params["ffn"]["w_gate"]`` [L, D, F])."""
    dtype = cfg.weight_dtype
    out: dict = {}
    for spec in llama_params(cfg):
        if spec.per_layer:
            arr = np.empty(spec.our_shape(cfg), dtype)
            for i in range(cfg.num_layers):
                arr[i] = _read_checked(reader, spec, i, cfg)
        else:
            arr = np.asarray(_read_checked(reader, spec, None, cfg), dtype)
        group, name = spec.ours
        out.setdefault(group, {})[name] = arr
    return out


def llama_from_params(cfg: LlamaConfig, params: dict) -> Llama:
    """A concrete Llama whose parameters are ``params`` (the nested dict of :func:`host_params`: our
    stacked layout, e.g. ``tok.embed`` [V, D], ``attn.wq`` [L, D, H*hd], ``ffn.w_down`` [L, F, D])."""
    graphdef, state = nnx.split(abstract_llama(cfg), nnx.Param)
    nnx.replace_by_pure_dict(state, {g: {k: jnp.asarray(v) for k, v in d.items()} for g, d in params.items()})
    return nnx.merge(graphdef, state)


def warn_unused(reader: ParamReader, cfg: LlamaConfig, where: str) -> list[str]:
    """Warn (:class:`UnusedTensorsWarning`) naming the tensors of ``reader`` no parameter of ``cfg`` reads
    (e.g. a rotary ``inv_freq`` buffer, or weights of a layer beyond ``num_layers``); returns them."""
    used = {reader.name_of(spec, i) for spec in llama_params(cfg)
            for i in (range(cfg.num_layers) if spec.per_layer else (None,))}
    unused = sorted(set(reader.tensor_names()) - used)
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... ({len(unused)} in all)" if len(unused) > 8 else "")
        warnings.warn(f"{where}: {len(unused)} tensor(s) the model does not use: {shown}", UnusedTensorsWarning,
                      stacklevel=3)
    return unused


def build_llama(reader: ParamReader, cfg: LlamaConfig, where: str = "source") -> Llama:
    """Read every parameter of ``cfg`` from ``reader`` and return the model (warning about unused tensors)."""
    model = llama_from_params(cfg, host_params(reader, cfg))
    warn_unused(reader, cfg, where)
    return model
