"""Read-ME: the pre-gating router + an MoE backbone whose layers all use the router's one expert per token.

    model = ReadMe(ReadMeConfig(base=llama_cfg, num_experts=E, expert_dim=Fe, router=router_cfg), rngs=...)
    logits = model(input_ids)                                 # router picks experts -> <float32>[B, T, V]
    logits = model(input_ids, expert_ids=ids)                 # oracle routing: int or <int32>[B, T]
    cache = model.init_cache(batch, max_len)                  # backbone KV cache + the router's own cache
    logits, cache = model(prompt_ids, attention_mask=m, cache=cache)
    logits, cache = model(next_ids[:, None], cache=cache)     # one incremental router step + one backbone step

Routing happens once per call, before the layer scan: expert ids -> ``moe.plan_dispatch`` (sort order,
group sizes) -> the same plan is closed over by every layer's FFN. Layout (fused, see ARCHITECTURE.md):
attention/norm weights stacked [L, ...] as in the dense model; experts w_gate/w_up [L, E, D, Fe],
w_down [L, E, Fe, D], each expert holding its shared + own channels.

Save/load: ``save_readme(model, dir)`` writes the common checkpoint layout (readme_jax.convert.checkpoint)
with kind "readme"; ``readme_jax.load_pretrained(dir)`` returns the ReadMe model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.model import moe
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import KVCache, positions_from_mask, run_layers
from readme_jax.model.llama import AttentionLayers, Embedding, _normal
from readme_jax.model.router import Router, RouterConfig

CHECKPOINT_KIND = "readme"


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
            raise ValueError(f"ReadMeConfig: router.num_experts={self.router.num_experts} != "
                             f"num_experts={self.num_experts}")
        if self.router.vocab_size != self.base.vocab_size:
            raise ValueError(f"ReadMeConfig: router.vocab_size={self.router.vocab_size} != "
                             f"base.vocab_size={self.base.vocab_size}")
        if self.domains and len(self.domains) != self.num_experts:
            raise ValueError(f"ReadMeConfig: {len(self.domains)} domains for num_experts={self.num_experts}")
        if not 0 < self.expert_dim:
            raise ValueError(f"ReadMeConfig: expert_dim must be positive, got {self.expert_dim}")

    def replace(self, **changes) -> "ReadMeConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "num_experts": self.num_experts, "expert_dim": self.expert_dim,
                "router": self.router.to_dict(), "domains": list(self.domains)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReadMeConfig":
        missing = {"base", "num_experts", "expert_dim", "router"} - set(d)
        if missing:
            raise ValueError(f"ReadMeConfig.from_dict: missing fields {sorted(missing)}")
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
        self.w_gate = _normal(rngs, (L, E, D, Fe), dt)
        self.w_up = _normal(rngs, (L, E, D, Fe), dt)
        self.w_down = _normal(rngs, (L, E, Fe, D), dt)

    def arrays(self) -> dict:
        return {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...]}


class ReadMe(nnx.Module):
    """Router-decoupled MoE LM. See the module docstring for the call forms."""

    def __init__(self, config: ReadMeConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok = Embedding(config.base, rngs)
        self.attn = AttentionLayers(config.base, rngs)
        self.experts = Experts(config, rngs)
        self.router = Router(config.router, rngs=rngs)

    def layer_arrays(self) -> dict:
        """Per-layer weights stacked along L (expert weights keep their E axis inside each layer)."""
        return {**self.attn.arrays(), **self.experts.arrays()}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> ReadMeCache:
        return ReadMeCache(backbone=KVCache.init(self.config.base, batch, max_len, dtype),
                           router=self.router.init_cache(batch, max_len))

    def route(self, input_ids, *, attention_mask=None, router_cache: KVCache | None = None):
        """The router's top-1 expert per token: <int32>[B, T] (with ``router_cache``: (ids, new cache))."""
        return self.router.route(input_ids, attention_mask=attention_mask, cache=router_cache)

    def _expert_ids(self, input_ids, attention_mask, expert_ids, cache):
        """expert ids <int32>[B, T] (given, or from the router, once) and the new router cache.

        With a cache the router always advances (so later calls without ``expert_ids`` stay correct),
        even when ``expert_ids`` overrides its choice."""
        routed, router_cache = None, None
        if cache is not None:
            routed, router_cache = self.route(input_ids, attention_mask=attention_mask, router_cache=cache.router)
        elif expert_ids is None:
            routed = self.route(input_ids, attention_mask=attention_mask)
        if expert_ids is None:
            return routed, router_cache
        if isinstance(expert_ids, (int, np.integer)) and not 0 <= expert_ids < self.config.num_experts:
            raise ValueError(f"ReadMe: expert_ids={expert_ids} is outside [0, {self.config.num_experts})")
        expert_ids = jnp.asarray(expert_ids, jnp.int32)
        if expert_ids.ndim == 0:
            return jnp.full(input_ids.shape, expert_ids, jnp.int32), router_cache
        if expert_ids.shape != input_ids.shape:
            raise ValueError(f"ReadMe: expert_ids has shape {expert_ids.shape}, expected input_ids' "
                             f"{input_ids.shape} (or an int)")
        return expert_ids, router_cache

    def hidden_states(self, input_ids, *, attention_mask=None, expert_ids=None, cache: ReadMeCache | None = None,
                      ffn_fn: Callable[[moe.DispatchPlan], Callable] | None = None, layers=None):
        """The decoder stack without the LM head: (x [B, T, D], cache, aux [L, ...]).

        ``ffn_fn(plan) -> layer_ffn`` builds the layer FFN from the one DispatchPlan of this call (default
        ``moe.moe_ffn_fn``); ``layer_ffn(layer_params, h[B, T, D]) -> (y, aux)`` sees this layer's
        w_gate/w_up [E, D, Fe], w_down [E, Fe, D] (see readme_jax.model.decoder). ``layers``: as in
        ``Llama.hidden_states`` (per-layer weights split once before a decode loop).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        ids, router_cache = self._expert_ids(input_ids, attention_mask, expert_ids, cache)
        plan = moe.plan_dispatch(ids, self.config.num_experts)          # once per call, outside the scan
        layer_ffn = (ffn_fn or moe.moe_ffn_fn)(plan)
        backbone = None if cache is None else cache.backbone
        positions = positions_from_mask(attention_mask, None if backbone is None else backbone.next_pos)
        x = self.tok.encode(input_ids)
        x, backbone, aux = run_layers(self.layer_arrays() if layers is None else layers, x, positions=positions, attention_mask_=attention_mask,
                                      cfg=self.config.base, ffn_fn=layer_ffn, cache=backbone)
        new_cache = None if cache is None else ReadMeCache(backbone=backbone, router=router_cache)
        return x, new_cache, aux

    def __call__(self, input_ids, *, attention_mask=None, expert_ids=None, cache: ReadMeCache | None = None,
                 layers=None):
        """input_ids <int32>[B, T] -> logits <float32>[B, T, V]; with ``cache``: (logits, new cache).

        expert_ids: None (the router decides), an int (every token), or <int32>[B, T] (oracle routing).
        """
        x, new_cache, _ = self.hidden_states(input_ids, attention_mask=attention_mask, expert_ids=expert_ids,
                                             cache=cache, layers=layers)
        logits = self.tok.decode(x)
        return logits if cache is None else (logits, new_cache)

    def token_nll(self, input_ids, targets, *, attention_mask=None, expert_ids=None):
        """<float32>[B, T]: -log p(targets | input_ids) per position (routing as in ``__call__``), the
        logits never materialised (model/head_loss.py)."""
        x, _, _ = self.hidden_states(input_ids, attention_mask=attention_mask, expert_ids=expert_ids)
        return self.tok.nll(x, targets)

    def num_params(self) -> int:
        """All parameters: embeddings, attention, E experts per layer, router."""
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def active_params(self) -> int:
        """Parameters one token uses: everything but the E - 1 experts it is not routed to."""
        b = self.config.base
        one_expert = 3 * b.num_layers * b.hidden_size * self.config.expert_dim
        return self.num_params() - (self.config.num_experts - 1) * one_expert


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the common layout of readme_jax.convert.checkpoint with kind "readme".

def save_readme(model: ReadMe, out: str | os.PathLike, tokenizer=None, *, overwrite: bool = False):
    """Write ``model`` (orbax params + config.json with {"readme_jax": {"kind": "readme", "version": 1}})
    and ``tokenizer`` to the directory ``out``, atomically. Returns the path."""
    from readme_jax.convert.checkpoint import save_checkpoint
    return save_checkpoint(out, model, tokenizer=tokenizer, kind=CHECKPOINT_KIND,
                           config=model.config.to_dict(), overwrite=overwrite)


def load_readme_checkpoint(path: str | os.PathLike, config: dict[str, Any], *, dtype=None,
                           **overrides) -> ReadMe:
    """The registered loader of kind "readme" (see ``readme_jax.convert.load.register_loader``).

    ``config``: the checkpoint's config dict; ``dtype``: None (as saved) or the param and compute dtype of
    the backbone and router; ``overrides``: fields of the base LlamaConfig (e.g. ``scan_layers=False``).
    """
    from readme_jax.convert.checkpoint import restore_params
    from readme_jax.convert.errors import CheckpointError

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
    abstract = nnx.eval_shape(lambda: ReadMe(cfg, rngs=nnx.Rngs(0)))
    return restore_params(path, abstract)


def load_readme(path: str | os.PathLike, *, dtype=None, **overrides):
    """(ReadMe, tokenizer or None) from a directory written by ``save_readme`` (``load_pretrained`` does
    the same for any kind)."""
    from readme_jax.convert.checkpoint import load_tokenizer_dir, read_checkpoint_config
    from readme_jax.convert.errors import CheckpointError

    found = read_checkpoint_config(path)
    if found is None or found[0] != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}/config.json: expected a readme_jax checkpoint of kind "
                              f"{CHECKPOINT_KIND!r}, found {None if found is None else found[0]!r}")
    return load_readme_checkpoint(path, found[1], dtype=dtype, **overrides), load_tokenizer_dir(path)


def _register() -> None:
    from readme_jax.convert.load import register_loader
    register_loader(CHECKPOINT_KIND, load_readme_checkpoint)


_register()
