"""The models' token-packed calls on paged KV pools (model/paged.py): dense or Read-ME backbone, router trunk.

    layers = packed_layers(model, dispatcher)                        # per-layer weights, once
    x, kv = backbone_packed(model, layers, tokens [N], meta, kv, experts=ids [N], dispatcher=d)
    logits = head_rows(model, x[rows])                                # the LM head on the sampling rows only
    rlayers = router_layers(model.router)
    ids, rkv = route_packed(model.router, rlayers, tokens [N], meta, rkv)   # top-1 expert per token

The backbone never routes (experts come from the router's earlier pass, as ``ReadMe.backbone``); ids outside
[0, E) give a token no expert. The router trunk is a Llama stack with its own pool (same page ids).

Dimension names: N packed tokens, D model, V vocab, E experts, R rows.
"""

from __future__ import annotations

import jax.numpy as jnp

from readme_jax.model import dispatch, moe
from readme_jax.model.decoder import dense_ffn, unstack_layers
from readme_jax.model.layers import rms_norm
from readme_jax.model.paged import CHUNK_PAGES, PagedMeta, packed_forward
from readme_jax.model.protocol import arch_config, is_routed
from readme_jax.model.router import top1_expert


def packed_layers(model, dispatcher: dispatch.Dispatcher | None = None) -> tuple[dict, ...]:
    """The L per-layer weight dicts of ``model`` (split once, before the steps); Read-ME's expert weights in
    ``dispatcher``'s layout (``Dispatcher.prepare_layer``)."""
    if is_routed(model):
        return model.decode_layers(dispatcher=dispatcher or dispatch.default_dispatcher())
    return unstack_layers(model.layer_arrays())


def backbone_packed(model, layers, tokens: jnp.ndarray, meta: PagedMeta, kv, *, experts=None, plan=None,
                    dispatcher: dispatch.Dispatcher | None = None, num_experts: int | None = None,
                    chunk_pages: int = CHUNK_PAGES):
    """tokens <int32>[N] through the backbone -> (x [N, D] before the final norm, kv).

    Read-ME: ``plan`` (prebuilt) or ``experts`` <int32>[N] planned here with ``dispatcher`` (default
    ``dispatch.default_dispatcher(N)``) over ``num_experts`` (default E; the resident pool's k when ``layers``
    hold its slots). Dense: both None."""
    cfg = arch_config(model)
    x = model.tok.encode(tokens)
    if is_routed(model):
        if plan is None:
            if experts is None:
                raise ValueError("backbone_packed: a Read-ME model needs experts= or plan= (it never routes)")
            plan = moe.plan_dispatch(experts, num_experts or model.num_experts, dispatcher=dispatcher)
        ffn = moe.moe_ffn_fn(plan)
    else:
        ffn = dense_ffn
    return packed_forward(layers, x, meta, kv, cfg, ffn, chunk_pages=chunk_pages)


def head_rows(model, x: jnp.ndarray) -> jnp.ndarray:
    """The final norm and LM head on some rows: x [R, D] -> <float32>[R, V]."""
    return model.tok.decode(x)


def router_layers(router) -> tuple[dict, ...]:
    """The router trunk's per-layer weights (attention + SwiGLU MLP), split once."""
    return unstack_layers({**router.attn.arrays(), **router.mlp.arrays()})


def route_packed(router, layers, tokens: jnp.ndarray, meta: PagedMeta, kv, *, chunk_pages: int = CHUNK_PAGES):
    """The router over N packed tokens (writing its keys/values into its pool ``kv``) -> (top-1 expert
    <int32>[N], kv)."""
    cfg = router.config.trunk_config()
    x, kv = packed_forward(layers, router.embed_tokens(tokens), meta, kv, cfg, dense_ffn, chunk_pages=chunk_pages)
    x = rms_norm(x, router.final_norm[...], cfg.rms_norm_eps)
    logits = (x @ router.head[...].astype(x.dtype)).astype(jnp.float32)
    return top1_expert(logits), kv
