"""Dense decoder of every registered family (Llama, Mistral, Qwen2; model/families.py) as a Flax NNX module.

    model = Llama(LlamaConfig(...), rngs=nnx.Rngs(0))
    logits = model(input_ids)                               # [B, T] -> <float32>[B, T, V]
    cache = model.init_cache(batch, max_len)                # prefill + incremental decode
    logits, cache = model(prompt_ids, attention_mask=m, cache=cache)
    logits, cache = model(next_ids[:, None], cache=cache)

Batched prompts of different lengths are left-padded (``attention_mask`` False on the padding); RoPE
positions count real tokens only, so a left-padded row gives the same logits as the row alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.model.config import LlamaConfig
from readme_jax.model.decoder import KVCache, dense_ffn, positions_from_mask, run_layers, unstack_layers
from readme_jax.model.head_loss import head_nll, weighted_loss
from readme_jax.model.layers import matmul_out_major, rms_norm


def normal_param(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> nnx.Param:
    """A parameter of ``shape`` drawn from N(0, std^2) in float32, stored in ``dtype`` (every init here)."""
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class AttentionLayers(nnx.Module):
    """The attention half of every layer plus both norms, stacked along L; with ``cfg.qkv_bias`` (Qwen2) also
    the q/k/v projection biases bq [L, H*hd], bk/bv [L, K*hd] (``decoder.project_qkv`` adds them)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        L, D, dt = cfg.num_layers, cfg.hidden_size, cfg.weight_dtype
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = nnx.Param(jnp.ones((L, D), dt))
        self.wq = normal_param(rngs, (L, D, q_dim), dt)
        self.wk = normal_param(rngs, (L, D, kv_dim), dt)
        self.wv = normal_param(rngs, (L, D, kv_dim), dt)
        self.wo = normal_param(rngs, (L, q_dim, D), dt)
        self.mlp_norm = nnx.Param(jnp.ones((L, D), dt))
        self.names = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm")
        if cfg.qkv_bias:
            self.bq = normal_param(rngs, (L, q_dim), dt)
            self.bk = normal_param(rngs, (L, kv_dim), dt)
            self.bv = normal_param(rngs, (L, kv_dim), dt)
            self.names += ("bq", "bk", "bv")

    def arrays(self) -> dict:
        return {k: getattr(self, k)[...] for k in self.names}


class DenseFFN(nnx.Module):
    """SwiGLU FFN weights stacked along L: w_gate/w_up [L, D, F], w_down [L, F, D]."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        L, D, F, dt = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.w_gate = normal_param(rngs, (L, D, F), dt)
        self.w_up = normal_param(rngs, (L, D, F), dt)
        self.w_down = normal_param(rngs, (L, F, D), dt)

    def arrays(self) -> dict:
        return {"w_gate": self.w_gate[...], "w_up": self.w_up[...], "w_down": self.w_down[...]}


class Embedding(nnx.Module):
    """Token embedding [V, D], the final norm [D] and the LM head [D, V] (absent when tied)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        V, D, dt = cfg.vocab_size, cfg.hidden_size, cfg.weight_dtype
        self.cfg = cfg
        self.embed = normal_param(rngs, (V, D), dt)
        self.final_norm = nnx.Param(jnp.ones((D,), dt))
        self.lm_head = None if cfg.tie_word_embeddings else normal_param(rngs, (D, V), dt)

    def encode(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """<int32>[B, T] -> [B, T, D] in the compute dtype."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.cfg.compute_dtype)

    def decode(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, T, D] -> <float32>[B, T, V] logits."""
        x = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        if self.lm_head is None:                     # the embedding [V, D] is the head held out-major
            return matmul_out_major(x, self.embed[...].astype(x.dtype)).astype(jnp.float32)
        return (x @ self.lm_head[...].astype(x.dtype)).astype(jnp.float32)

    def head_input(self, x: jnp.ndarray) -> jnp.ndarray:
        """[..., D] decoder output -> the final-normed [..., D] the LM head reads."""
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)

    def head(self) -> tuple[jnp.ndarray, bool]:
        """(head weight, vocab_major): the embedding [V, D] when tied, else lm_head [D, V]."""
        tied = self.lm_head is None
        return (self.embed[...] if tied else self.lm_head[...]), tied

    def nll(self, x: jnp.ndarray, targets: jnp.ndarray, *, head_grad: bool = True) -> jnp.ndarray:
        """[B, T, D] decoder output, <int32>[B, T] targets -> <float32>[B, T] next-token NLL, equal to
        ``-log_softmax(decode(x))[targets]`` without materialising the logits (model/head_loss.py).
        ``head_grad=False``: no gradient for the head weight (a frozen embedding)."""
        x = self.head_input(x)
        head, vocab_major = self.head()
        nll = head_nll(x.reshape(-1, x.shape[-1]), head, targets.reshape(-1), vocab_major=vocab_major,
                       head_grad=head_grad)
        return nll.reshape(targets.shape)

    def weighted_loss(self, x: jnp.ndarray, targets: jnp.ndarray, nll_weights: jnp.ndarray, *,
                      teacher: tuple[jnp.ndarray, jnp.ndarray] | None = None, kl_weights: jnp.ndarray | None = None,
                      temperature: float = 1.0, head_grad: bool = True):
        """(sum of a x NLL + b x T^2 KL <float32>[], NLL, KL <float32>[B, T] without gradient): x [B, T, D]
        decoder output, targets <int32>[B, T], a = ``nll_weights`` / b = ``kl_weights`` [B, T] (no gradient);
        ``teacher`` = (the teacher's final-normed hidden states [B, T, D], its head in this head's layout).
        The sum's gradient is computed in the forward, each chunk's logits once (model/head_loss.weighted_loss):
        for training losses linear in the per-token NLL and KL."""
        x = self.head_input(x)
        head, vocab_major = self.head()
        flat = lambda a: None if a is None else a.reshape(-1, *a.shape[targets.ndim:])
        total, nll, kl = weighted_loss(flat(x), head, flat(targets), flat(nll_weights), vocab_major=vocab_major,
                                       teacher=None if teacher is None else (flat(teacher[0]), teacher[1]),
                                       kl_weights=flat(kl_weights), temperature=temperature, head_grad=head_grad)
        return total, nll.reshape(targets.shape), kl.reshape(targets.shape)


class Llama(nnx.Module):
    """Dense decoder-only LM. See the module docstring for the call forms."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok = Embedding(config, rngs)
        self.attn = AttentionLayers(config, rngs)
        self.ffn = DenseFFN(config, rngs)

    @property
    def arch(self) -> LlamaConfig:
        """The decoder architecture (``model/protocol.py``)."""
        return self.config

    def layer_arrays(self) -> dict:
        """All per-layer weights as one dict of stacked [L, ...] arrays."""
        return {**self.attn.arrays(), **self.ffn.arrays()}

    def decode_layers(self, num_tokens: int = 1) -> tuple[dict, ...]:
        """The L per-layer weight dicts, split once before a decode loop (``decoder.unstack_layers``); the
        ``layers=`` of the calls inside it (ReadMe.decode_layers is the same for the MoE; ``num_tokens``, the
        tokens per step, only matters there)."""
        return unstack_layers(self.layer_arrays())

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.init(self.config, batch, max_len, dtype)

    def hidden_states(self, input_ids, *, attention_mask=None, cache=None, ffn_fn=dense_ffn, layers=None):
        """input_ids <int32>[B, T] (attention_mask <bool>[B, T], False on left padding) through the decoder
        stack without the LM head: (x [B, T, D], cache, aux [L, ...]).

        ``ffn_fn(layer_params, h) -> (y, aux)`` replaces the FFN (statistics passes use it to collect
        per-layer activations; see readme_jax.model.decoder). ``layers``: the layer weights to use, e.g.
        ``unstack_layers(model.layer_arrays())`` made once before a decode loop (default: the stacked ones).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        start = None if cache is None else cache.next_pos
        positions = positions_from_mask(attention_mask, start)
        x = self.tok.encode(input_ids)
        return run_layers(self.layer_arrays() if layers is None else layers, x, positions=positions, attention_mask_=attention_mask,
                          cfg=self.config, ffn_fn=ffn_fn, cache=cache)

    def __call__(self, input_ids, *, attention_mask=None, cache: KVCache | None = None, layers=None):
        """input_ids <int32>[B, T] -> logits <float32>[B, T, V]; with ``cache``: (logits, new cache)."""
        x, new_cache, _ = self.hidden_states(input_ids, attention_mask=attention_mask, cache=cache, layers=layers)
        logits = self.tok.decode(x)
        return logits if cache is None else (logits, new_cache)

    def token_nll(self, input_ids, targets, *, attention_mask=None):
        """<float32>[B, T]: -log p(targets <int32>[B, T] | input_ids <int32>[B, T]) per position, the logits
        never materialised."""
        x, _, _ = self.hidden_states(input_ids, attention_mask=attention_mask)
        return self.tok.nll(x, targets)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
