"""The pre-gating router: a small causal LM over token ids that names one expert per token.

    router = Router(RouterConfig(...), rngs=nnx.Rngs(0))
    logits = router(input_ids)                                # [B, T] -> <float32>[B, T, E]
    expert_ids = router.route(input_ids)                      # <int32>[B, T], argmax
    cache = router.init_cache(batch, max_len)                 # prefill + one incremental step per token
    logits, cache = router(prompt_ids, attention_mask=m, cache=cache)
    logits, cache = router(next_ids[:, None], cache=cache)

It sees only token ids x_<=t (never the backbone's hidden states), so every queued token can be routed
before the backbone runs, and its expert id is used by *all* backbone layers. The trunk is a Llama decoder
stack (the same pure functions and KVCache as the dense model, with K = H kv heads): RMSNorm, RoPE,
1/sqrt(head_dim) attention scaling, SwiGLU MLP, then a final RMSNorm and a linear head to E logits.
Differences from the authors' code (docs/architecture.md): no q/k/v/o biases, a gated (SwiGLU) MLP as in the paper's
Table 1, 1/sqrt(hd) scaling (their script divides by 1), and an optional low-rank token embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.errors import ConfigError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import KVCache, dense_ffn, positions_from_mask, run_layers
from readme_jax.model.layers import rms_norm
from readme_jax.model.llama import AttentionLayers, DenseFFN, normal_param


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Router size. Letters: V vocab, R embedding rank, Dr router dim, Fr router MLP width, E experts.

    The defaults are this project's choice for SmolLM2-135M (V = 49,152, E = 7); ``paper_table1`` is the
    paper's router. Why the defaults differ from Table 1: at V = 49,152 a full 512-dim table alone is 25.2M
    parameters, 19% of the 135M backbone (Table 1's 18.0M router is 0.4% of Read-ME-7B's 4.7B active
    parameters), and the table is >90% of the router either way. The routing signal is mostly lexical, so
    the table keeps every token but at rank R = 64, factorised as embed [V, R] @ embed_proj [R, Dr] and
    initialised from the backbone's own embedding (truncated SVD, ``Router.init_embedding_from``); the
    trunk is halved to Dr = 256 (4 heads of 64, as the backbone's head_dim), Fr = 512. Parameters at
    V = 49,152, E = 7:
        embed 3,145,728 + embed_proj 16,384 + attention 262,144 + SwiGLU MLP 393,216
        + 3 norms 768 + head 1,792 = 3,820,032  (~3.8M, ~4% of the ~95M active parameters of a
        7-expert, keep-0.5 Read-ME SmolLM2-135M; 1.1% of its ~334M total).
    ``embed_rank=None`` stores a full [V, Dr] table (the paper's form).
    """

    vocab_size: int = 49152
    dim: int = 256
    n_layers: int = 1
    n_heads: int = 4
    mlp_dim: int = 512
    num_experts: int = 7
    embed_rank: int | None = 64
    rope_theta: float = 10000.0
    max_len: int = 8192
    rms_norm_eps: float = 1e-5
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError(f"RouterConfig: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.embed_rank is not None and not 0 < self.embed_rank:
            raise ConfigError(f"RouterConfig: embed_rank must be a positive int or None, got {self.embed_rank}")
        if self.num_experts < 1:
            raise ConfigError(f"RouterConfig: num_experts must be >= 1, got {self.num_experts}")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)

    @classmethod
    def paper_table1(cls, vocab_size: int = 32000, num_experts: int = 7, **overrides) -> "RouterConfig":
        """Paper Table 1: 1 layer, 4 heads, dim = MLP dim = 512, full embedding (18.2M at V = 32,000, E = 7
        with the gated MLP; the paper's 18.0M counts the authors' ungated 2-matrix MLP)."""
        fields = dict(vocab_size=vocab_size, dim=512, n_layers=1, n_heads=4, mlp_dim=512,
                      num_experts=num_experts, embed_rank=None)
        fields.update(overrides)
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def trunk_config(self) -> LlamaConfig:
        """The transformer trunk as a LlamaConfig, so the decoder's functions and KVCache serve it."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.dim, intermediate_size=self.mlp_dim,
                           num_layers=self.n_layers, num_heads=self.n_heads, num_kv_heads=self.n_heads,
                           head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                           max_position_embeddings=self.max_len, tie_word_embeddings=True,
                           dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=True)

    def num_params(self) -> int:
        """Parameter count, computed from the sizes (equals ``Router.num_params()``)."""
        V, Dr, Fr, L, E = self.vocab_size, self.dim, self.mlp_dim, self.n_layers, self.num_experts
        embed = V * Dr if self.embed_rank is None else V * self.embed_rank + self.embed_rank * Dr
        block = 4 * Dr * Dr + 3 * Dr * Fr + 2 * Dr
        return embed + L * block + Dr + Dr * E

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouterConfig":
        return cls(**d)


def top1_expert(logits: jnp.ndarray) -> jnp.ndarray:
    """The routing decision everywhere (router, trainer, evaluations): <float>[..., E] -> <int32>[...] argmax."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class Router(nnx.Module):
    """Token embedding -> n causal transformer blocks -> RMSNorm -> Linear to E logits (see module doc).

    Params: embed [V, R] and embed_proj [R, Dr] (or embed [V, Dr] when ``embed_rank`` is None),
    attn / mlp stacked over the router's n_layers (the dense decoder's layouts), final_norm [Dr],
    head [Dr, E]. See RouterConfig for the default size and its reasoning.
    """

    def __init__(self, config: RouterConfig, *, rngs: nnx.Rngs):
        self.config = config
        trunk = config.trunk_config()
        dt = trunk.weight_dtype
        width = config.dim if config.embed_rank is None else config.embed_rank
        self.embed = normal_param(rngs, (config.vocab_size, width), dt)
        self.embed_proj = None if config.embed_rank is None else normal_param(
            rngs, (width, config.dim), dt, std=width ** -0.5)
        self.attn = AttentionLayers(trunk, rngs)
        self.mlp = DenseFFN(trunk, rngs)
        self.final_norm = nnx.Param(jnp.ones((config.dim,), dt))
        self.head = normal_param(rngs, (config.dim, config.num_experts), dt)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """The router's own KV cache (n_layers layers, Dr-wide): [n_layers, B, S, H, hd]."""
        return KVCache.init(self.config.trunk_config(), batch, max_len, dtype)

    def embed_tokens(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """<int32>[B, T] -> [B, T, Dr] in the compute dtype."""
        dt = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        if self.embed_proj is not None:
            x = x @ self.embed_proj[...].astype(dt)
        return x

    def __call__(self, input_ids: jnp.ndarray, *, attention_mask: jnp.ndarray | None = None,
                 cache: KVCache | None = None):
        """input_ids <int32>[B, T] (left-padded, ``attention_mask`` <bool>[B, T] False on padding) ->
        logits <float32>[B, T, E]; with ``cache``: (logits, new cache), T new tokens in one step."""
        trunk = self.config.trunk_config()
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        positions = positions_from_mask(attention_mask, None if cache is None else cache.next_pos)
        layers = {**self.attn.arrays(), **self.mlp.arrays()}
        x, new_cache, _ = run_layers(layers, self.embed_tokens(input_ids), positions=positions,
                                     attention_mask_=attention_mask, cfg=trunk, ffn_fn=dense_ffn, cache=cache)
        x = rms_norm(x, self.final_norm[...], trunk.rms_norm_eps)
        logits = (x @ self.head[...].astype(x.dtype)).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def route(self, input_ids: jnp.ndarray, *, attention_mask: jnp.ndarray | None = None,
              cache: KVCache | None = None):
        """Top-1 expert per token: <int32>[B, T]; with ``cache``: (expert_ids, new cache)."""
        out = self(input_ids, attention_mask=attention_mask, cache=cache)
        logits, new_cache = (out, None) if cache is None else out
        ids = top1_expert(logits)
        return ids if cache is None else (ids, new_cache)

    def init_embedding_from(self, table, *, seed: int = 0) -> None:
        """Initialise the token embedding from a backbone's table [V, D] (same vocabulary).

        Truncated SVD: table ~= U_R S_R Vt_R. Factorised: embed = U_R S_R [V, R] (each token's coordinates
        in the table's top-R subspace), embed_proj = an orthonormal-row map [R, Dr] (an isometry when
        R <= Dr), so the router starts from the backbone's token geometry. Full table: U_r S_r @ that map.
        """
        table = np.asarray(jax.device_get(table), np.float32)
        cfg = self.config
        if table.shape[0] != cfg.vocab_size:
            raise ValueError(f"Router.init_embedding_from: table has {table.shape[0]} rows, the router's "
                             f"vocab_size is {cfg.vocab_size}")
        rank = cfg.dim if cfg.embed_rank is None else cfg.embed_rank
        u, s, _ = np.linalg.svd(table, full_matrices=False)
        r = min(rank, s.shape[0])
        coords = np.zeros((table.shape[0], rank), np.float32)
        coords[:, :r] = u[:, :r] * s[:r]
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((max(rank, cfg.dim), min(rank, cfg.dim))))
        proj = (q if rank >= cfg.dim else q.T).astype(np.float32)       # [rank, Dr], orthonormal rows/cols
        dt = self.embed[...].dtype
        if self.embed_proj is None:
            self.embed.set_value(jnp.asarray(coords @ proj, dt))
        else:
            self.embed.set_value(jnp.asarray(coords, dt))
            self.embed_proj.set_value(jnp.asarray(proj, self.embed_proj[...].dtype))

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
