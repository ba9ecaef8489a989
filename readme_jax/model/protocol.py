"""The model protocol: what the engine, evaluation and training may ask of a model, instead of ``hasattr``.

    from readme_jax.model.protocol import arch_config, is_routed
    cfg = arch_config(model)          # the decoder architecture (LlamaConfig): vocab, dims, heads, RoPE
    if is_routed(model):              # a RoutedLM: route() ahead of the backbone, backbone() never routes
        ids = model.route(prompt_ids)

Every model is a ``CausalLM``: token ids in, next-token distributions out, over one decoder stack
(``model/decoder.py``). A ``RoutedLM`` (``ReadMe``) additionally routes tokens ahead of its backbone, so a
server knows each queued token's expert before the backbone runs. ``Llama`` is a plain ``CausalLM``.
A new family (another architecture config, attention variant or MoE) implements these methods; callers
never test class names, ``architecture`` strings or attributes.

Dimension names: B rows, T tokens, V vocab, D hidden, L layers, E experts.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp

from readme_jax.errors import ConfigError


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only LM. ``tok``: the token table (``encode`` ids -> [B, T, D], ``decode`` [B, T, D] ->
    logits [B, T, V], ``nll``); ``arch``: its decoder architecture config."""

    tok: Any

    @property
    def arch(self) -> Any:
        """The decoder architecture config (``LlamaConfig``): vocab_size, hidden_size, layers, heads, RoPE."""

    def layer_arrays(self) -> dict:
        """Per-layer weights stacked along L."""

    def decode_layers(self, num_tokens: int = 1) -> tuple[dict, ...]:
        """The L per-layer weight dicts, split once before a decode loop."""

    def hidden_states(self, input_ids: jnp.ndarray, *, attention_mask=None, cache=None, layers=None):
        """input_ids <int32>[B, T] -> (x [B, T, D], cache, aux)."""

    def token_nll(self, input_ids: jnp.ndarray, targets: jnp.ndarray, *, attention_mask=None) -> jnp.ndarray:
        """<float32>[B, T]: -log p(targets | input_ids) per position."""

    def num_params(self) -> int:
        """All parameters."""


@runtime_checkable
class RoutedLM(CausalLM, Protocol):
    """A CausalLM whose tokens are routed ahead of the backbone by a decoupled router (Read-ME)."""

    @property
    def num_experts(self) -> int:
        """E, the experts of every layer."""

    def route(self, input_ids: jnp.ndarray, *, attention_mask=None, router_cache=None):
        """The router's expert per token <int32>[B, T] (with ``router_cache``: (ids, new cache))."""

    def backbone(self, input_ids: jnp.ndarray, *, plan=None, expert_ids=None, cache=None, attention_mask=None,
                 layers=None, dispatcher=None, ffn_fn=None):
        """The decoder stack without router and head, never routing: (x [B, T, D], cache, aux)."""


def is_routed(model: Any) -> bool:
    """Whether ``model`` routes tokens ahead of its backbone (a ``RoutedLM``)."""
    return isinstance(model, RoutedLM)


def arch_config(model: Any):
    """The decoder architecture config of ``model`` (a ``CausalLM``)."""
    if not isinstance(model, CausalLM):
        raise ConfigError(f"{type(model).__name__} is not a CausalLM (readme_jax.model.protocol): it lacks "
                          f"one of tok, arch, layer_arrays, decode_layers, hidden_states, token_nll, num_params")
    return model.arch
