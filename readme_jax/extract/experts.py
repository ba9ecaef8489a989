"""Expert materialisation (method step 3): gather each expert's channels out of the dense FFN, fused layout.

Expert e at layer l = rows of W_gate / W_up (as [D, F] matrices: their columns) and rows of W_down at the
sorted channel indices ``masks.expert_channels()[l, e]`` (shared + own, Fe of them). Because SwiGLU is
per-channel, expert e's FFN equals the dense FFN with its intermediate multiplied by (shared + mask_e).

Letters: L layers, E experts, D model, F dense ffn, Fe channels per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.extract.masks import ExpertMasks
from readme_jax.model import moe
from readme_jax.model.readme import ReadMe, ReadMeConfig
from readme_jax.model.router import Router, RouterConfig


def materialize_experts(dense_ffn_arrays: dict, masks: ExpertMasks) -> dict[str, jnp.ndarray]:
    """dense w_gate/w_up [L, D, F], w_down [L, F, D] -> w_gate/w_up [L, E, D, Fe], w_down [L, E, Fe, D]."""
    w_gate, w_up, w_down = (jnp.asarray(dense_ffn_arrays[k]) for k in ("w_gate", "w_up", "w_down"))
    L, D, F = w_gate.shape
    if (L, F) != (masks.num_layers, masks.ffn_dim):
        raise ValueError(f"materialize_experts: dense w_gate is [L={L}, D={D}, F={F}], the masks are "
                         f"[L={masks.num_layers}, F={masks.ffn_dim}]")
    if w_up.shape != (L, D, F) or w_down.shape != (L, F, D):
        raise ValueError(f"materialize_experts: expected w_up [{L}, {D}, {F}] and w_down [{L}, {F}, {D}], "
                         f"got {tuple(w_up.shape)} and {tuple(w_down.shape)}")
    g, u, d = moe.gather_experts(w_gate, w_up, w_down, jnp.asarray(masks.expert_channels()))
    return {"w_gate": g, "w_up": u, "w_down": d}


def readme_from_dense(dense, masks: ExpertMasks, router_cfg: RouterConfig, *, rngs: nnx.Rngs,
                      init_router_embedding: bool = True, tied: bool = False) -> ReadMe:
    """A ReadMe whose embedding, attention and norms are the dense model's and whose experts are gathered
    from its FFN by ``masks``; the router is freshly initialised (its token embedding from the dense
    model's table when ``init_router_embedding``). ``router_cfg.num_experts`` must equal the masks' E.

    ``tied``: the experts stay the dense FFN's channel tables with each expert's channel list
    (:class:`readme_jax.model.readme.TiedExperts`, for expert tuning; ``model.untied()`` gives the fused
    layout). Every weight is a copy, so a train step that donates them never invalidates ``dense`` (the
    distillation teacher)."""
    cfg = dense.config
    if router_cfg.num_experts != masks.num_experts:
        raise ValueError(f"readme_from_dense: router_cfg.num_experts={router_cfg.num_experts}, the masks "
                         f"have E={masks.num_experts}")
    if router_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"readme_from_dense: router_cfg.vocab_size={router_cfg.vocab_size}, the dense "
                         f"model's is {cfg.vocab_size}")
    rcfg = ReadMeConfig(base=cfg, num_experts=masks.num_experts, expert_dim=masks.expert_dim,
                        router=router_cfg, domains=masks.domains)
    # Built abstractly and filled: only the router is randomly initialised (no throw-away expert init).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ReadMe(rcfg, rngs=nnx.Rngs(0), tied=tied)))
    router = Router(router_cfg, rngs=rngs)
    if init_router_embedding:
        router.init_embedding_from(dense.tok.embed[...])
    dt = cfg.weight_dtype
    copy = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
    params = {
        "tok": copy(nnx.to_pure_dict(nnx.state(dense.tok, nnx.Param))),
        "attn": copy(nnx.to_pure_dict(nnx.state(dense.attn, nnx.Param))),
        "experts": ({**{k: jnp.array(v, dt, copy=True) for k, v in dense.ffn.arrays().items()},
                     "channels": jnp.asarray(masks.expert_channels())} if tied else
                    {k: v.astype(dt) for k, v in materialize_experts(dense.ffn.arrays(), masks).items()}),
        "router": nnx.to_pure_dict(nnx.state(router, nnx.Param)),
    }
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
