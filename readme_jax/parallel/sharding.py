"""One table of logical axes for every weight and activation, and the rules that map them onto the mesh.

Every parameter's name carries its dimension letters (as flax gemma's ShardingConfig does):

    L layers   V vocab   D model   Q query heads x head_dim   K kv heads x head_dim   F FFN channels
    E experts  r the router's own dimensions (never sharded: the router is ~0.1% of the 7B model)
    B batch rows   T time   S cache slots   H head_dim   N tokens

``RULES`` maps a letter to the mesh axes it is split over, in order of preference:

    E -> expert          each device of the "expert" axis owns E / expert experts
    D -> fsdp            FSDP: params, gradients and optimizer state split on the model dimension
    B -> data, fsdp, expert   every device takes its own rows

An axis goes to the first letter (in the param's priority order E, D, F, V) whose dimension it divides and
that no other axis took; a mesh axis left over (E = 7 on expert = 4) is placed on the next dimension it
divides (F: the experts' channels), so storage stays sharded and nothing is replicated for lack of a divisor.
The expert-parallel dispatcher (parallel/expert_parallel.py) pads / tiles E to the axis inside the step.

    shardings = param_shardings(state, mesh)        # NamedSharding per leaf of an nnx.State / pytree
    state = place(state, shardings)
    opt_shardings = opt_state_shardings(tx, state, shardings)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.model.families import param_axes as family_param_axes
from readme_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, FSDP_AXIS

# name (the last two path keys joined by ".", or the last one) -> dimension letters
PARAM_AXES: dict[str, str] = {
    "tok.embed": "VD", "tok.lm_head": "DV", "tok.final_norm": "D",
    "attn.attn_norm": "LD", "attn.mlp_norm": "LD",
    "attn.wq": "LDQ", "attn.wk": "LDK", "attn.wv": "LDK", "attn.wo": "LQD",
    "experts.w_gate": "LEDF", "experts.w_up": "LEDF", "experts.w_down": "LEFD",
    "ffn.w_gate": "LDF", "ffn.w_up": "LDF", "ffn.w_down": "LFD",
    **family_param_axes(),         # each family's own params (Qwen2: attn.bq "LQ", attn.bk / attn.bv "LK")
}
# tied experts (model/readme.TiedExperts): channel tables [L, D, F] / [L, F, D] and the channel lists
TIED_AXES: dict[str, str] = {"experts.w_gate": "LDF", "experts.w_up": "LDF", "experts.w_down": "LFD",
                             "experts.channels": "LEF"}
ROUTER_KEY = "router"              # every param under it: letters "r..." (replicated)

# activations and caches, by the same letters
ACTIVATION_AXES: dict[str, str] = {
    "hidden": "BTD", "tokens": "BT", "kv_cache": "LBSKH", "cache_rows": "BS",
}

RULES: dict[str, tuple[str, ...]] = {"E": (EXPERT_AXIS,), "D": (FSDP_AXIS,), "B": BATCH_AXES}
PRIORITY = "EDFV"                  # which dimension gets a mesh axis first
FALLBACK = {EXPERT_AXIS: "FDV"}    # where a mesh axis goes when its own letter cannot take it


def _path_name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    keys = [k for k in keys if k not in ("value",)]
    return ".".join(keys)


def axes_of(path_name: str, ndim: int) -> str:
    """The dimension letters of the param at dotted ``path_name`` (KeyError naming it if the table lacks it)."""
    parts = path_name.split(".")
    if ROUTER_KEY in parts:
        return "r" * ndim
    for key in (".".join(parts[-2:]), parts[-1]):
        known = [t[key] for t in (PARAM_AXES, TIED_AXES) if key in t]
        for letters in known:
            if len(letters) == ndim:
                return letters
        if known:
            raise ValueError(f"sharding: {path_name} has {ndim} dimensions, the table says {known[0]!r}")
    raise KeyError(f"sharding: no logical axes for parameter {path_name!r}; add it to "
                   "readme_jax.parallel.sharding.PARAM_AXES")


def spec_for(letters: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """The PartitionSpec of an array with dimension ``letters`` and ``shape`` under RULES on ``mesh``."""
    out: list[list[str]] = [[] for _ in letters]
    taken: set[str] = set()

    def free(dim: int, axis: str) -> bool:
        size = int(np.prod([mesh.shape[a] for a in out[dim]] + [mesh.shape[axis]]))
        return shape[dim] % size == 0

    for letter in sorted(set(letters), key=lambda c: PRIORITY.index(c) if c in PRIORITY else len(PRIORITY)):
        for axis in RULES.get(letter, ()):
            dim = letters.index(letter)
            if mesh.shape.get(axis, 1) > 1 and axis not in taken and free(dim, axis):
                out[dim].append(axis)
                taken.add(axis)
    for axis, letters_next in FALLBACK.items():
        wanted = any(axis in RULES.get(c, ()) for c in letters)
        if wanted and axis not in taken and mesh.shape.get(axis, 1) > 1:
            for c in letters_next:
                if c in letters and free(letters.index(c), axis):
                    out[letters.index(c)].append(axis)
                    taken.add(axis)
                    break
    return P(*[None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in out])


def param_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """A NamedSharding for every array leaf of ``tree`` (an nnx.State or pytree of params, or their
    ShapeDtypeStructs), by its path's letters."""
    def one(path, leaf):
        letters = axes_of(_path_name(path), len(leaf.shape))
        return NamedSharding(mesh, spec_for(letters, tuple(leaf.shape), mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, shardings: Any) -> Any:
    """Shardings of ``tx.init(params)``: each moment like its param, counts and scalars replicated."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def place(tree: Any, shardings: Any) -> Any:
    """``tree`` on the devices of ``shardings`` (resharded if it is already elsewhere). With several
    processes, each builds its own devices' shards from its (identical) copy of ``tree``."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``: the analytic
    count the memory plan checks the compiled argument sizes against."""
    def one(leaf, s):
        shard = s.shard_shape(tuple(leaf.shape))
        return int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))
