"""``jit_method``: call an NNX module's method under ``jax.jit`` with its weights a traced argument.

    nll = jit_method(model, lambda m, ids, tg: m.token_nll(ids, tg))     # split once
    nll(ids, targets)                                                    # jitted; weights are not constants

The module is split once (``nnx.split``) into a static graph and its state; the jitted function merges them
inside the trace, so the weights are arguments (not baked into the program as constants) and one compile
serves every call of the same shapes. ``graphdef`` replaces the module's own graph (e.g. a bf16 compute
graph over the same f32 state); ``jit_kwargs`` go to ``jax.jit`` (``static_argnames``; positional indices
count from the first argument after the state).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def jit_method(module: nnx.Module, fn: Callable[..., Any], *, graphdef=None, **jit_kwargs) -> Callable[..., Any]:
    """``call(*args, **kw) = fn(module, *args, **kw)``, jitted with the module's state as a traced argument."""
    own, state = nnx.split(module)
    graph = own if graphdef is None else graphdef
    for key in ("static_argnums", "donate_argnums"):
        if key in jit_kwargs:
            nums = jit_kwargs[key]
            jit_kwargs[key] = tuple(n + 1 for n in ((nums,) if isinstance(nums, int) else nums))
    jitted = jax.jit(lambda st, *args, **kw: fn(nnx.merge(graph, st), *args, **kw), **jit_kwargs)

    def call(*args, **kw):
        return jitted(state, *args, **kw)

    return call
