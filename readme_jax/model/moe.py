"""The routed MoE FFN: top-1 experts chosen once per batch by the pre-gating router, shared by every layer.

The data's way through one layer (each step under ``jax.named_scope``; the kernels are in model/dispatch/):
  plan_dispatch (once per batch, outside the layer scan)  expert_ids -> the dispatcher's plan
  permute       h [N, D] -> x [P, D]       rows as the kernel wants them (e.g. grouped by expert)
  expert_ffn    x [P, D] -> y [P, D]       every row through its expert's SwiGLU
  unpermute     y [P, D] -> [N, D]         back to token order

``moe_ffn(plan, h, ...)`` runs them with the dispatcher that made the plan; ``moe_ffn_fn(plan)`` is the
same as a layer FFN for ``decoder.run_layers``; ``reference_moe_ffn`` (every expert on every token, then
select) is the slow oracle for tests.

Tied experts (training): a layer may hold channel tables instead of per-expert weights - w_gate/w_up
[D, F], w_down [F, D] and ``channels`` <int32>[E, Fe], expert e being the table columns / rows
``channels[e]`` (one weight per channel, shared by every expert that holds it). ``fused_layer`` gathers them
into the per-expert layout inside the layer, so every dispatcher runs unchanged, and the gradient of the
gather sums each channel's updates over all experts (all their tokens) that use it. The layer FFN runs under
``jax.checkpoint`` saving everything but the gathered weights (named ``GATHERED``): the backward regathers them
(~1 ms a layer) instead of the layer scan stacking 3 x [L, E, D, Fe] copies as residuals (~0.8 GB for
SmolLM2; the expert step's peak RSS 6.47 -> 5.98 GB at 4 x 512 tokens, its time unchanged).

Dimension names: B batch, T time, N = B*T tokens, D model, Fe expert width, E experts, P kernel rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from readme_jax.model import dispatch
from readme_jax.model.dispatch.decode import num_experts_of


GATHERED = "tied_experts_gathered"
_GATHERED_NOT_SAVED = jax.checkpoint_policies.save_anything_except_these_names(GATHERED)


def plan_dispatch(expert_ids: jnp.ndarray, num_experts: int, *,
                  dispatcher: dispatch.Dispatcher | None = None):
    """The dispatch plan of top-1 routing: expert_ids <int32>[B, T] or [N] -> ``dispatcher``'s plan
    (default ``dispatch.default_dispatcher(N)``). Ids outside [0, E) give their token no expert."""
    dispatcher = dispatcher or dispatch.default_dispatcher(expert_ids.size)
    return dispatcher.plan(expert_ids, num_experts)


def moe_ffn(plan, h: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
    """Top-1 routed SwiGLU FFN. h [B, T, D] (or [N, D]); w_gate/w_up [E, D, Fe], w_down [E, Fe, D] (the
    decode dispatcher also takes them split per expert).

    Returns h's shape: token t gets (SiLU(h_t W_gate[e]) * (h_t W_up[e])) W_down[e], e = its expert in
    ``plan``, and 0 when it has none. Runs the dispatcher that made ``plan``.
    """
    d = plan.dispatcher
    shape = h.shape
    if num_experts_of(w_gate) != plan.num_experts:
        raise ValueError(f"moe_ffn: w_gate has {num_experts_of(w_gate)} experts, the plan {plan.num_experts}")
    flat = h.reshape(-1, shape[-1])
    if flat.shape[0] != plan.num_tokens:
        raise ValueError(f"moe_ffn: h has {flat.shape[0]} tokens, the plan {plan.num_tokens}")
    x = d.permute(plan, flat)
    y = d.expert_ffn(plan, x, w_gate, w_up, w_down)
    return d.unpermute(plan, y).reshape(shape)


def gather_experts(w_gate, w_up, w_down, channels) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per-expert weights from channel tables: w_gate/w_up [..., D, F], w_down [..., F, D], channels
    <int32>[..., E, Fe] (leading dims, e.g. L, shared) -> w_gate/w_up [..., E, D, Fe], w_down [..., E, Fe, D]."""
    def one(wg, wu, wd, ix):                    # [D, F], [D, F], [F, D], [E, Fe]
        # columns taken as rows of the transpose: the gather's gradient is then a scatter-add of whole
        # D-rows, not of single elements (XLA CPU: 2.8 vs 17 ms per SmolLM2 table, ~0.9 s of an expert step)
        cols = lambda w: jnp.swapaxes(jnp.take(w.T, ix, axis=0), 1, 2)                  # [E, D, Fe]
        return cols(wg), cols(wu), jnp.take(wd, ix, axis=0)                               # [E, Fe, D]
    for _ in range(channels.ndim - 2):
        one = jax.vmap(one)
    return one(w_gate, w_up, w_down, channels)


def fused_layer(p: dict) -> dict:
    """A layer's params in the per-expert layout: tied tables (with ``channels``) gathered, else as they are."""
    if "channels" not in p:
        return p
    g, u, d = (checkpoint_name(w, GATHERED) for w in gather_experts(p["w_gate"], p["w_up"], p["w_down"],
                                                                       p["channels"]))
    return {**{k: v for k, v in p.items() if k != "channels"}, "w_gate": g, "w_up": u, "w_down": d}


def moe_ffn_fn(plan) -> Callable:
    """ffn_fn for ``run_layers``: (layer_params, h [B, T, D]) -> (y [B, T, D], None), reading the layer's
    w_gate/w_up [E, D, Fe] and w_down [E, Fe, D] (or tied tables + ``channels``: gathered here, or laid out by
    the plan's dispatcher when it ``takes_tables``)."""
    def run(p: dict, h: jnp.ndarray):
        p = plan.dispatcher.prepare_layer(p) if plan.dispatcher.takes_tables and "channels" in p else fused_layer(p)
        return moe_ffn(plan, h, p["w_gate"], p["w_up"], p["w_down"])

    def ffn(p: dict, h: jnp.ndarray):
        if "channels" in p:
            return jax.checkpoint(run, policy=_GATHERED_NOT_SAVED)(p, h), None
        return run(p, h), None
    return ffn


def reference_moe_ffn(expert_ids: jnp.ndarray, h: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
    """Masked-dense oracle: every expert's FFN on every token, then each token keeps its expert's output.

    expert_ids <int32>[B, T] (or [N]; ids outside [0, E) -> 0), h [B, T, D] (or [N, D]), w_gate/w_up
    [E, D, Fe], w_down [E, Fe, D] -> h's shape."""
    dt = h.dtype
    act = jax.nn.silu(jnp.einsum("...d,edf->...ef", h, w_gate.astype(dt))) * \
        jnp.einsum("...d,edf->...ef", h, w_up.astype(dt))
    y = jnp.einsum("...ef,efd->...ed", act, w_down.astype(dt))                         # [..., E, D]
    onehot = jax.nn.one_hot(expert_ids.reshape(h.shape[:-1]), w_gate.shape[0], dtype=dt)
    return jnp.einsum("...ed,...e->...d", y, onehot)
