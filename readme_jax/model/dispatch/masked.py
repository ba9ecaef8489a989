"""The "masked" dispatcher: tied experts run as their channel tables, each token's SwiGLU intermediate
masked to its expert's channels (the authors' masked-dense form, at inference).

Tied experts (``model/readme.py``, ``TiedExperts``) are one table of F channels per layer, expert e being the
table's channels ``channels[e]`` (Fe of them). The per-expert kernels (grouped, blocked, ragged) read each
expert a step uses: u distinct experts cost u x Fe channel columns per layer. This kernel reads the F columns
of the tables once, whatever the experts, and zeroes the channels outside each token's expert (silu(0) = 0,
so a masked gate is the expert's gate): F <= u x Fe from u = F / Fe distinct experts (SmolLM2's default
run: Fe = F / 2, so from 2). Its FLOPs are F per token instead of Fe. Outputs equal the per-expert kernels' up
to the order of the down projection's sum (its extra terms are exact zeros).

The serving runner picks it per step from the experts it knows before the step runs (the pre-gating
router's lookahead, ``serve/paged_runner.py``; "decode" when the step's experts hold fewer channels). Measured on CPU (30 layers, D 576, F 1536, Fe 768, E 5,
2 cores): 8 rows over 5 / 2 / 1 experts 22.6 / 22.3 / 22.6 ms vs grouped 52.9 / 27.8 / 17.8; 32 rows 39.1 /
37.6 / 37.2 vs 80.0 / 42.4 / 24.8; 64 rows over 5 experts 50.3 vs blocked 119; 256 rows over 5 / 2 158 / 156
vs blocked 192 / 155; the dense FFN 22.0 / 37.4 / 47.0 / 157.6 at 8 / 32 / 64 / 256 rows.

Weights (``prepare_layer``, once, from a tied layer): w_gate a :class:`MaskedGate` (the gate table out-major
and the channel mask <float>[F, E]), w_up / w_down the tables out-major. Expert ids outside [0, E) mask every
channel (their rows are 0). Inference only: training gathers the tied experts (``moe.fused_layer``).

Dimension names: N tokens, D model, F channels of the tables, Fe expert width, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from readme_jax.model.dispatch.base import DISPATCHERS
from readme_jax.model.dispatch.decode import Decode, DecodePlan
from readme_jax.model.layers import OutMajor, masked_swiglu
from readme_jax.registry import SELF


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedGate:
    """The gate table of tied experts with each expert's channels: ``table`` out-major (logical [D, F]) and
    ``mask`` <float>[F, E] (1 where expert e holds channel f). Expert e's gate is the table's columns where
    mask[:, e] is 1."""

    table: OutMajor
    mask: jnp.ndarray

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]


def channel_mask(channels: jnp.ndarray, num_channels: int, dtype) -> jnp.ndarray:
    """channels <int32>[E, Fe] (each expert's channels) -> <dtype>[F, E], 1 where expert e holds channel f."""
    E = channels.shape[0]
    return jnp.zeros((num_channels, E), dtype).at[channels, jnp.arange(E)[:, None]].set(1)


@DISPATCHERS.register("masked", SELF)
@dataclasses.dataclass(frozen=True)
class Masked(Decode):
    """Tied experts as their channel tables, every token through all F channels, masked to its expert's."""

    takes_tables: ClassVar[bool] = True

    def expert_ffn(self, plan: DecodePlan, x: jnp.ndarray, w_gate, w_up, w_down) -> jnp.ndarray:
        """x [N, D] -> [N, D]; w_gate a MaskedGate, w_up / w_down the out-major tables (``prepare_layer``)."""
        if not isinstance(w_gate, MaskedGate):
            raise ValueError("masked dispatcher: expects a layer made by its prepare_layer (tied experts' channel "
                             f"tables), got w_gate of type {type(w_gate).__name__}")
        dt = x.dtype
        idx = jnp.where(plan.expert_ids >= 0, plan.expert_ids, w_gate.num_experts)   # -1 would wrap: out of range
        mask = jnp.take(w_gate.mask.astype(dt), idx, axis=1, mode="fill", fill_value=0)            # [F, N]
        with jax.named_scope("expert_ffn"):
            return masked_swiglu(x, w_gate.table.astype(dt), w_up.astype(dt), w_down.astype(dt), mask)

    def prepare_layer(self, layer: dict) -> dict:
        """A tied layer (w_gate/w_up [D, F], w_down [F, D], channels [E, Fe]) -> this kernel's layout."""
        if "channels" not in layer:
            raise ValueError("masked dispatcher: needs tied experts (channel tables and each expert's channels); "
                             "this model's experts are stored per expert (an export of untied expert tuning)")
        rest = {k: v for k, v in layer.items() if k not in ("w_gate", "w_up", "w_down", "channels")}
        F = layer["w_gate"].shape[-1]
        mask = channel_mask(layer["channels"], F, layer["w_gate"].dtype)
        return {**rest, "w_gate": MaskedGate(OutMajor.of(layer["w_gate"]), mask),
                "w_up": OutMajor.of(layer["w_up"]), "w_down": OutMajor.of(layer["w_down"])}
