"""Step-time cost model at paper scale (a Llama-2-7B-class Read-ME on an A100), parameters from
``configs/costmodel/a100_llama2_7b.yaml`` (public specifications, cited there).

One step's time, per layer (every layer does the same work, since routing is shared):
    compute c = (attention weights + KV-cache bytes read + distinct experts x expert bytes) / HBM bandwidth
                + prefill FLOPs / peak FLOP/s
    load    λ = misses x expert bytes / link bandwidth
plus, once per step, the LM head and router weights over HBM bandwidth. Decode is memory-bound, so its FLOPs
are not charged; a prefill chunk's FLOPs are (2 x tokens x (attention + expert parameters) + 4 x attended
positions x heads x head_dim). Loads go over one serial link; how much of λ is hidden depends on prefetch:
- ``none``: a layer's missing experts load when the layer is reached: step = fixed + L (c + λ);
- ``layer-ahead``: layer l+1's loads are issued when layer l starts computing (layer 0's at step start);
- ``step-ahead``: every layer's set is known a step early: layer l's loads are issued when layer l of the
  previous step finished (its slots are free then), so they overlap the rest of that step and any idle time.
Stall = step time - (fixed + L c). The analytic bound on what any prefetch can save over a run: with total
compute C = sum (fixed + L c) and total loads Λ = sum L λ, no schedule beats max(C, Λ), so the gain over no
prefetch is at most min(C, Λ) / (C + Λ) (= compute / (compute + load) when loads dominate).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import yaml

from readme_jax.errors import ConfigError

PREFETCH_MODES = ("none", "layer-ahead", "step-ahead")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden: int
    expert_width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    bytes_per_param: float = 2.0
    router_params: float = 0.0

    @property
    def expert_params(self) -> float:
        return 3.0 * self.hidden * self.expert_width

    @property
    def expert_bytes(self) -> float:
        """One expert of one layer: 3 x D x Fe x bytes (gate, up, down)."""
        return self.expert_params * self.bytes_per_param

    @property
    def attn_params(self) -> float:
        return float(self.num_heads + 2 * self.num_kv_heads + self.num_heads) * self.head_dim * self.hidden

    @property
    def attn_bytes(self) -> float:
        return self.attn_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token at one layer."""
        return 2.0 * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def fixed_bytes(self) -> float:
        """Read once per step: the LM head and the router."""
        return (self.vocab * self.hidden + self.router_params) * self.bytes_per_param


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    hbm_bytes_per_s: float
    link_bytes_per_s: float
    peak_flops: float
    hbm_bytes: float = 0.0
    expert_pool_bytes: float = 0.0

    def capacity(self, model: ModelSpec) -> int:
        """Resident experts per layer that the expert pool holds."""
        return int(self.expert_pool_bytes // (model.num_layers * model.expert_bytes))

    def scaled(self, *, hbm: float = 1.0, link: float = 1.0) -> "HardwareSpec":
        """The same hardware with HBM and link bandwidths multiplied (the sensitivity sweep)."""
        return dataclasses.replace(self, hbm_bytes_per_s=self.hbm_bytes_per_s * hbm,
                                   link_bytes_per_s=self.link_bytes_per_s * link)


def _build(cls, section: dict, where: str):
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(section) - set(fields)
    missing = [n for n, f in cls.__dataclass_fields__.items()
               if f.default is dataclasses.MISSING and n not in section]
    if unknown or missing:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}, missing keys {missing}; expected "
                          f"{sorted(fields)}")
    out = {}
    for k, v in section.items():
        try:
            out[k] = int(v) if fields[k] == "int" else float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{k}: expected a number, got {v!r}") from None
    return cls(**out)


def load_codesign_config(path: str | Path) -> tuple[ModelSpec, HardwareSpec, dict]:
    """(model, hardware, serving settings) from a codesign YAML (see configs/costmodel/a100_llama2_7b.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such codesign config")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in ("model", "hardware", "serving"):
        if not isinstance(raw.get(key), dict):
            raise ConfigError(f"{path}: missing section {key!r}")
    model = _build(ModelSpec, raw["model"], f"{path}: model")
    hw = _build(HardwareSpec, raw["hardware"], f"{path}: hardware")
    return model, hw, dict(raw["serving"])


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one step runs. decode_tokens / decode_context: decode tokens and the sum of their context
    lengths (KV rows each reads); prefill_tokens / prefill_context: prefill chunk tokens and the KV rows of
    earlier chunks they read; prefill_attended: sum over chunk tokens of positions attended; experts:
    distinct experts of the step (decode and prefill); misses: loads per layer."""

    decode_tokens: int = 0
    decode_context: int = 0
    prefill_tokens: int = 0
    prefill_context: int = 0
    prefill_attended: int = 0
    experts: int = 0
    misses: int = 0


class CostModel:
    """Step times for a model on a hardware; ``step`` keeps the link / previous-step state step-ahead needs."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, prefetch: str = "layer-ahead"):
        if prefetch not in PREFETCH_MODES:
            raise ConfigError(f"CostModel: prefetch {prefetch!r} is unknown; known: {PREFETCH_MODES}")
        self.model, self.hw, self.prefetch = model, hw, prefetch
        self.reset()

    def reset(self) -> None:
        self.link_free = 0.0
        self.prev_layer_end: np.ndarray | None = None

    def layer_compute_s(self, w: StepWork) -> float:
        """c: one layer's compute time for ``w`` (see the module doc)."""
        m = self.model
        kv_rows = w.decode_tokens + w.decode_context + w.prefill_tokens + w.prefill_context
        nbytes = m.attn_bytes + kv_rows * m.kv_bytes_per_token + w.experts * m.expert_bytes
        flops = (2.0 * w.prefill_tokens * (m.attn_params + m.expert_params)
                 + 4.0 * w.prefill_attended * m.num_heads * m.head_dim)
        return nbytes / self.hw.hbm_bytes_per_s + flops / self.hw.peak_flops

    def layer_load_s(self, w: StepWork) -> float:
        """λ: one layer's load time for its misses over the link."""
        return w.misses * self.model.expert_bytes / self.hw.link_bytes_per_s

    def fixed_s(self) -> float:
        return self.model.fixed_bytes / self.hw.hbm_bytes_per_s

    def step(self, w: StepWork, start: float) -> tuple[float, float]:
        """(step seconds, stall seconds) of a step beginning at time ``start``."""
        L = self.model.num_layers
        c, lam, fixed = self.layer_compute_s(w), self.layer_load_s(w), self.fixed_s()
        if lam == 0.0:
            self.prev_layer_end = start + c * np.arange(1, L + 1)
            return float(fixed + L * c), 0.0
        if self.prefetch == "none":
            self.prev_layer_end = start + (c + lam) * np.arange(1, L + 1)
            return float(fixed + L * (c + lam)), float(L * lam)
        link = max(self.link_free, 0.0)
        end_prev = start
        starts = np.empty(L)
        ends = np.empty(L)
        for layer in range(L):
            if self.prefetch == "layer-ahead":
                issue = start if layer == 0 else starts[layer - 1]
            else:
                issue = start if self.prev_layer_end is None else self.prev_layer_end[layer]
            done = max(issue, link) + lam
            link = done
            starts[layer] = max(end_prev, done)
            end_prev = ends[layer] = starts[layer] + c
        self.link_free, self.prev_layer_end = link, ends
        total = end_prev - start + fixed
        return float(total), float(total - fixed - L * c)

    def compute_and_load_s(self, w: StepWork) -> tuple[float, float]:
        """(fixed + L c, L λ): the step's compute and its loads, the two terms of the prefetch bound."""
        L = self.model.num_layers
        return self.fixed_s() + L * self.layer_compute_s(w), L * self.layer_load_s(w)


def check_capacity(model: ModelSpec, hw: HardwareSpec, num_experts: int) -> int:
    """k from the expert pool; an error unless 1 <= k < E (the cache must matter)."""
    k = hw.capacity(model)
    if not 1 <= k < num_experts:
        per = model.num_layers * model.expert_bytes
        raise ConfigError(f"hardware.expert_pool_bytes={hw.expert_pool_bytes:.3g} holds k={k} experts per layer "
                          f"({per:.3g} B each across layers); need 1 <= k < E={num_experts}")
    return k

