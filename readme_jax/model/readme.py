"""Read-ME: the pre-gating router + an MoE backbone whose layers all use the router's one expert per token.

Routed calls (the router runs first, inside the call):
    model = ReadMe(ReadMeConfig(base=llama_cfg, num_experts=E, expert_dim=Fe, router=router_cfg), rngs=...)
    logits = model(input_ids)                                 # router picks experts -> <float32>[B, T, V]
    logits = model(input_ids, expert_ids=ids)                 # oracle routing: int or <int32>[B, T]
    nll = model.token_nll(input_ids, targets)                 # <float32>[B, T], logits never materialised
    cache = model.init_cache(batch, max_len)                  # ReadMeCache: backbone + the router's own cache
    logits, cache = model(prompt_ids, attention_mask=m, cache=cache)
    logits, cache = model(next_ids[:, None], cache=cache)     # one incremental router step + one backbone step

Route apart from run (serving: a token is routed as soon as it is known, the backbone runs later):
    rcache = model.router.init_cache(batch, max_len); bcache = model.init_backbone_cache(batch, max_len)
    ids, rcache = model.route(new_ids, attention_mask=m, router_cache=rcache)    # incremental router step
    plan = moe.plan_dispatch(ids, E, dispatcher=d)                               # optional: a prebuilt plan
    x, bcache, aux = model.backbone(new_ids, plan=plan, cache=bcache, attention_mask=m)   # never routes
    x, bcache, aux = model.backbone(new_ids, expert_ids=ids, cache=bcache)                # plans, never routes
    logits = model.tok.decode(x)                                                  # [B, T, D] -> [B, T, V]
    layers = model.decode_layers(dispatcher=d)   # per-layer weights in d's layout, once before a decode loop

Routing happens once per call, before the layer scan: expert ids -> a dispatcher's plan
(``moe.plan_dispatch``, model/dispatch/) -> the same plan is closed over by every layer's FFN. Expert ids
outside [0, E) (-1: an inactive serving slot) give a token no expert (its FFN output is 0). Layout (fused,
see docs/architecture.md): attention/norm weights stacked [L, ...] as in the dense model; experts
w_gate/w_up [L, E, D, Fe], w_down [L, E, Fe, D], each expert holding its shared + own channels.

Tied form (expert tuning): ``ReadMe(cfg, rngs=..., tied=True)`` holds :class:`TiedExperts` instead - one
table per layer of all F channels (w_gate/w_up [L, D, F], w_down [L, F, D]) and each expert's channel list
``channels`` <int32>[L, E, Fe]; every layer gathers its experts from the tables (``moe.fused_layer``), so a
channel several experts hold is one weight trained by all their tokens (the authors' masked-dense form).
``model.untied()`` materialises the fused layout for evaluation, serving and export.

Save/load: ``readme_jax.convert.readme_checkpoint.save_readme(model, dir)`` writes kind "readme";
``readme_jax.load_pretrained(dir)`` returns the ReadMe model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.errors import ConfigError
from readme_jax.model import dispatch, moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import KVCache, positions_from_mask, run_layers, unstack_layers
from readme_jax.model.llama import AttentionLayers, Embedding, normal_param
from readme_jax.model.router import Router, RouterConfig


@dataclasses.dataclass(frozen=True)
class ReadMeConfig:
    """base: the dense model's config (attention, vocab, norms; its intermediate_size is the dense F);
    num_experts E; expert_dim Fe (channels per expert, shared + own); router; domains (E names)."""

    base: LlamaConfig
    num_experts: int
    expert_dim: int
    router: RouterConfig
    domains: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.router.num_experts != self.num_experts:
            raise ConfigError(f"ReadMeConfig: router.num_experts={self.router.num_experts} != "
                             f"num_experts={self.num_experts}")
        if self.router.vocab_size != self.base.vocab_size:
            raise ConfigError(f"ReadMeConfig: router.vocab_size={self.router.vocab_size} != "
                             f"base.vocab_size={self.base.vocab_size}")
        if self.domains and len(self.domains) != self.num_experts:
            raise ConfigError(f"ReadMeConfig: {len(self.domains)} domains for num_experts={self.num_experts}")
        if not 0 < self.expert_dim:
            raise ConfigError(f"ReadMeConfig: expert_dim must be positive, got {self.expert_dim}")

    def replace(self, **changes) -> "ReadMeConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "num_experts": self.num_experts, "expert_dim": self.expert_dim,
                "router": self.router.to_dict(), "domains": list(self.domains)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReadMeConfig":
        missing = {"base", "num_experts", "expert_dim", "router"} - set(d)
        if missing:
            raise ConfigError(f"ReadMeConfig.from_dict: missing fields {sorted(missing)}")
        return cls(base=LlamaConfig.from_dict(d["base"]), num_experts=int(d["num_experts"]),
                   expert_dim=int(d["expert_dim"]), router=RouterConfig.from_dict(d["router"]),
                   domains=tuple(d.get("domains", ())))


@flax.struct.dataclass
class ReadMeCache:
    """backbone: the decoder's KVCache [L, B, S, K, hd]; router: the router's own KVCache."""

    backbone: KVCache
    router: KVCache


class Experts(nnx.Module):
    """Expert FFN weights stacked over layers and experts: w_gate/w_up [L, E, D, Fe], w_down [L, E, Fe, D]."""

    def __init__(self, config: ReadMeConfig, rngs: nnx.Rngs):
        b = config.base
        L, E, D, Fe, dt = b.num_layers, config.num_experts, b.hidden_size, config.expert_dim, b.weight_dtype
        self.w_gate = normal_param(rngs, (L, E, D, Fe), dt)
        self.w_up = normal_param(rngs, (L, E, D, Fe), dt)
        self.w_down = normal_param(rngs, (L, E, Fe, D), dt)

    def arrays(self) -> dict:
        return {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...]}

    def fused(self) -> dict:
        """The per-expert layout (these arrays; ``TiedExperts.fused`` gathers it)."""
        return self.arrays()


class ExpertChannels(nnx.Variable):
    """The channel lists of tied experts (an index, never trained): <int32>[L, E, Fe]."""


class TiedExperts(nnx.Module):
    """Channel tables w_gate/w_up [L, D, F], w_down [L, F, D] and each expert's sorted channels
    ``channels`` <int32>[L, E, Fe] into them (F: the dense FFN width). Expert e at layer l is the tables'
    columns (w_down: rows) ``channels[l, e]``."""

    def __init__(self, config: ReadMeConfig, rngs: nnx.Rngs):
        b = config.base
        L, E, D, F, dt = b.num_layers, config.num_experts, b.hidden_size, b.intermediate_size, b.weight_dtype
        self.w_gate = normal_param(rngs, (L, D, F), dt)
        self.w_up = normal_param(rngs, (L, D, F), dt)
        self.w_down = normal_param(rngs, (L, F, D), dt)
        self.channels = ExpertChannels(jnp.zeros((L, E, config.expert_dim), jnp.int32))

    def arrays(self) -> dict:
        """The tables and ``channels`` (``moe.fused_layer`` gathers one layer's experts from them)."""
        return {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...],
                "channels": self.channels[...]}

    def fused(self) -> dict:
        """The per-expert layout: w_gate/w_up [L, E, D, Fe], w_down [L, E, Fe, D]."""
        g, u, d = moe.gather_experts(self.w_gate[...], self.w_up[...], self.w_down[...], self.channels[...])
        return {"w_gate": g, "w_up": u, "w_down": d}


class ReadMe(nnx.Module):
    """Router-decoupled MoE LM. See the module docstring for the call forms."""

    def __init__(self, config: ReadMeConfig, *, rngs: nnx.Rngs, tied: bool = False):
        self.config = config
        self.tok = Embedding(config.base, rngs)
        self.attn = AttentionLayers(config.base, rngs)
        self.experts = TiedExperts(config, rngs) if tied else Experts(config, rngs)
        self.router = Router(config.router, rngs=rngs)

    @property
    def tied(self) -> bool:
        """Whether the experts are tied channel tables (:class:`TiedExperts`)."""
        return isinstance(self.experts, TiedExperts)

    def untied(self) -> "ReadMe":
        """This model with its experts in the fused per-expert layout (itself when already fused); the other
        weights are shared, not copied."""
        if not self.tied:
            return self
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ReadMe(self.config, rngs=nnx.Rngs(0))))
        params = {name: nnx.to_pure_dict(nnx.state(getattr(self, name), nnx.Param))
                  for name in ("tok", "attn", "router")}
        params["experts"] = self.experts.fused()
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    @property
    def arch(self) -> LlamaConfig:
        """The backbone's decoder architecture (``model/protocol.py``)."""
        return self.config.base

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def layer_arrays(self) -> dict:
        """Per-layer weights stacked along L (expert weights keep their E axis inside each layer)."""
        return {**self.attn.arrays(), **self.experts.arrays()}

    def decode_layers(self, num_tokens: int = 1, dispatcher: dispatch.Dispatcher | None = None) -> tuple[dict, ...]:
        """The L per-layer weight dicts in ``dispatcher``'s layout (default: the one a call of ``num_tokens``
        tokens plans with, ``dispatch.default_dispatcher``), split once before a decode loop (see
        ``decoder.unstack_layers``)."""
        d = dispatcher or dispatch.default_dispatcher(num_tokens)
        return tuple(d.prepare_layer(p if d.takes_tables else moe.fused_layer(p))
                     for p in unstack_layers(self.layer_arrays()))

    def init_backbone_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """The backbone's KVCache [L, B, S, K, hd] (``backbone(cache=...)``)."""
        return KVCache.init(self.config.base, batch, max_len, dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> ReadMeCache:
        """The combined cache of a routed call: the backbone's and the router's KVCache."""
        return ReadMeCache(backbone=self.init_backbone_cache(batch, max_len, dtype),
                           router=self.router.init_cache(batch, max_len))

    def route(self, input_ids, *, attention_mask=None, router_cache: KVCache | None = None):
        """The router's top-1 expert per token: <int32>[B, T] (with ``router_cache``: (ids, new cache);
        then ``input_ids`` are the T tokens after those already in the cache)."""
        return self.router.route(input_ids, attention_mask=attention_mask, cache=router_cache)

    def _check_expert_ids(self, input_ids, expert_ids) -> jnp.ndarray:
        """expert_ids (an int, or <int32>[B, T] matching input_ids) -> <int32>[B, T]."""
        if isinstance(expert_ids, (int, np.integer)) and not 0 <= expert_ids < self.config.num_experts:
            raise ValueError(f"ReadMe: expert_ids={expert_ids} is outside [0, {self.config.num_experts})")
        expert_ids = jnp.asarray(expert_ids, jnp.int32)
        if expert_ids.ndim == 0:
            return jnp.full(input_ids.shape, expert_ids, jnp.int32)
        if expert_ids.shape != input_ids.shape:
            raise ValueError(f"ReadMe: expert_ids has shape {expert_ids.shape}, expected input_ids' "
                             f"{input_ids.shape} (or an int)")
        return expert_ids

    def backbone(self, input_ids, *, plan=None, expert_ids=None, cache: KVCache | None = None,
                 attention_mask=None, layers=None, dispatcher: dispatch.Dispatcher | None = None,
                 ffn_fn: Callable[[Any], Callable] | None = None):
        """The decoder stack without the router and the LM head: (x [B, T, D], backbone cache, aux [L, ...]).

        Never routes. Give exactly one of ``plan`` (prebuilt by ``moe.plan_dispatch`` for these B*T tokens;
        it names its dispatcher) or ``expert_ids`` (an int, or <int32>[B, T]; ids outside [0, E) get no
        expert), planned here once with ``dispatcher`` (default ``dispatch.default_dispatcher(B*T)``).
        input_ids <int32>[B, T]; attention_mask <bool>[B, T] (False on left padding); cache: the backbone's
        KVCache (``init_backbone_cache``), advanced by T. ``layers``: as in ``Llama.hidden_states`` (e.g.
        ``decode_layers(dispatcher=d)``, made once before a decode loop). ``ffn_fn(plan) -> layer_ffn`` builds the layer
        FFN from the plan (default ``moe.moe_ffn_fn``); ``layer_ffn(layer_params, h [B, T, D]) -> (y, aux)``
        sees this layer's w_gate/w_up [E, D, Fe], w_down [E, Fe, D] (tied: the tables + ``channels``, ``moe.fused_layer``).
        """
        if (plan is None) == (expert_ids is None):
            raise ValueError("ReadMe.backbone: give exactly one of plan= or expert_ids= (it never routes; "
                             "ReadMe.route gives the router's ids)")
        if plan is None:
            ids = self._check_expert_ids(input_ids, expert_ids)
            plan = moe.plan_dispatch(ids, self.config.num_experts, dispatcher=dispatcher)   # outside the scan
        elif dispatcher is not None:
            dispatcher.check_plan(plan)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        layer_ffn = (ffn_fn or moe.moe_ffn_fn)(plan)
        positions = positions_from_mask(attention_mask, None if cache is None else cache.next_pos)
        x = self.tok.encode(input_ids)
        return run_layers(self.layer_arrays() if layers is None else layers, x, positions=positions,
                          attention_mask_=attention_mask, cfg=self.config.base, ffn_fn=layer_ffn, cache=cache)

    def hidden_states(self, input_ids, *, attention_mask=None, expert_ids=None, cache: ReadMeCache | None = None,
                      ffn_fn: Callable[[Any], Callable] | None = None, layers=None,
                      dispatcher: dispatch.Dispatcher | None = None):
        """Route, then ``backbone``: (x [B, T, D], ReadMeCache or None, aux [L, ...]).

        expert_ids None: the router's ids; an int or <int32>[B, T]: those (oracle routing). With ``cache``
        the router always advances on its own cache (so later calls without ``expert_ids`` stay correct),
        even when ``expert_ids`` overrides its choice. Other arguments as in ``backbone``.
        """
        routed, router_cache = None, None
        if cache is not None:
            routed, router_cache = self.route(input_ids, attention_mask=attention_mask, router_cache=cache.router)
        elif expert_ids is None:
            routed = self.route(input_ids, attention_mask=attention_mask)
        x, backbone, aux = self.backbone(input_ids, expert_ids=routed if expert_ids is None else expert_ids,
                                         cache=None if cache is None else cache.backbone,
                                         attention_mask=attention_mask, layers=layers, dispatcher=dispatcher,
                                         ffn_fn=ffn_fn)
        new_cache = None if cache is None else ReadMeCache(backbone=backbone, router=router_cache)
        return x, new_cache, aux

    def __call__(self, input_ids, *, attention_mask=None, expert_ids=None, cache: ReadMeCache | None = None,
                 layers=None, dispatcher: dispatch.Dispatcher | None = None):
        """input_ids <int32>[B, T] -> logits <float32>[B, T, V]; with ``cache``: (logits, new cache).

        expert_ids: None (the router decides), an int (every token), or <int32>[B, T] (oracle routing).
        """
        x, new_cache, _ = self.hidden_states(input_ids, attention_mask=attention_mask, expert_ids=expert_ids,
                                             cache=cache, layers=layers, dispatcher=dispatcher)
        logits = self.tok.decode(x)
        return logits if cache is None else (logits, new_cache)

    def token_nll(self, input_ids, targets, *, attention_mask=None, expert_ids=None):
        """<float32>[B, T]: -log p(targets <int32>[B, T] | input_ids <int32>[B, T]) per position (routing as
        in ``__call__``), the logits never materialised (model/head_loss.py)."""
        x, _, _ = self.hidden_states(input_ids, attention_mask=attention_mask, expert_ids=expert_ids)
        return self.tok.nll(x, targets)

    def num_params(self) -> int:
        """All parameters: embeddings, attention, E experts per layer, router."""
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def active_params(self) -> int:
        """Parameters one token uses: everything but the experts it is not routed to."""
        b = self.config.base
        one_expert = 3 * b.num_layers * b.hidden_size * self.config.expert_dim
        experts = sum(x.size for x in jax.tree.leaves(nnx.state(self.experts, nnx.Param)))
        return self.num_params() - experts + one_expert
