"""Expert masks from per-domain channel scores (method step 3).

Per domain d and layer l keep exactly k = round(keep_ratio * F) channels with the largest score (ties go to
the lower channel index) -> domain mask d. The shared (permanent) channels are those every domain keeps;
expert-specific mask d = domain mask d minus the shared channels. Expert d in *every* layer comes from
domain d. In the fused layout expert d holds shared + own channels = its domain mask, width Fe = k in
every layer, so the experts stack as [L, E, D, Fe] for the layer scan.

Note: expert-specific masks are disjoint from the shared mask, but for E > 2 two experts can both hold a
channel that a third domain dropped (pairwise disjoint only when E = 2).

Letters: E experts (= domains), L layers, F ffn channels, Fe = k channels per expert.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from readme_jax.atomic import atomic_file
from readme_jax.model.config import LlamaConfig


def _check_keep_ratio(keep_ratio: float) -> None:
    if not (isinstance(keep_ratio, (int, float)) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"build_masks: keep_ratio must be in (0, 1], got {keep_ratio!r}")


@dataclasses.dataclass(frozen=True)
class ExpertMasks:
    """domain <bool>[E, L, F]; each (e, l) row holds exactly Fe True entries. ``domains``: E names."""

    domain: np.ndarray
    domains: tuple[str, ...] = ()

    def __post_init__(self):
        dom = np.asarray(self.domain, bool)
        if dom.ndim != 3:
            raise ValueError(f"ExpertMasks: domain must be bool[E, L, F], got shape {dom.shape}")
        counts = dom.sum(-1)
        if not np.all(counts == counts.flat[0]):
            raise ValueError(f"ExpertMasks: every (domain, layer) must keep the same number of channels, "
                             f"got counts from {counts.min()} to {counts.max()}")
        names = tuple(self.domains) or tuple(f"expert{e}" for e in range(dom.shape[0]))
        if len(names) != dom.shape[0]:
            raise ValueError(f"ExpertMasks: {len(names)} domain names for {dom.shape[0]} masks")
        object.__setattr__(self, "domain", dom)
        object.__setattr__(self, "domains", names)

    @property
    def num_experts(self) -> int:
        return self.domain.shape[0]

    @property
    def num_layers(self) -> int:
        return self.domain.shape[1]

    @property
    def ffn_dim(self) -> int:
        return self.domain.shape[2]

    @property
    def expert_dim(self) -> int:
        """Fe: channels per expert (shared + own) in every layer."""
        return int(self.domain[0, 0].sum()) if self.domain.size else 0

    @property
    def shared(self) -> np.ndarray:
        """<bool>[L, F]: channels every domain keeps (intersection)."""
        return np.all(self.domain, axis=0)

    @property
    def specific(self) -> np.ndarray:
        """<bool>[E, L, F]: domain mask minus the shared channels."""
        return self.domain & ~self.shared[None]

    def expert_channels(self) -> np.ndarray:
        """<int32>[L, E, Fe]: sorted channel indices of expert e at layer l (shared + own, fused layout)."""
        E, L, F = self.domain.shape
        idx = np.nonzero(self.domain.transpose(1, 0, 2))[2]     # row-major: sorted within each (l, e)
        return idx.reshape(L, E, self.expert_dim).astype(np.int32)

    def report(self, config: LlamaConfig | None = None, *, router_params: int = 0) -> dict[str, Any]:
        """Mask sizes and, given the dense config, the Read-ME parameter counts (the paper's "4.7B-17B").

        Returns a dict: ``shared`` int[L] and ``specific`` int[E, L] channel counts, ``expert_dim``; with
        ``config``: ``non_ffn_params``, ``expert_params`` (one expert, all layers), ``active_params``
        (non-FFN + one expert per layer + router), ``total_params`` (non-FFN + E experts per layer +
        router), ``dense_params``, and ``summary`` e.g. "4.6B-17.6B".
        """
        out: dict[str, Any] = {
            "domains": list(self.domains),
            "expert_dim": self.expert_dim,
            "ffn_dim": self.ffn_dim,
            "shared": self.shared.sum(-1).astype(int).tolist(),
            "specific": self.specific.sum(-1).astype(int).tolist(),
        }
        if config is not None:
            if config.num_layers != self.num_layers or config.intermediate_size != self.ffn_dim:
                raise ValueError(f"ExpertMasks.report: masks are [L={self.num_layers}, F={self.ffn_dim}], the "
                                 f"config has L={config.num_layers}, F={config.intermediate_size}")
            non_ffn = non_ffn_params(config)
            expert = 3 * config.hidden_size * self.expert_dim * config.num_layers
            active = non_ffn + expert + router_params
            total = non_ffn + self.num_experts * expert + router_params
            out.update(non_ffn_params=non_ffn, expert_params=expert, router_params=router_params,
                       active_params=active, total_params=total,
                       dense_params=non_ffn + 3 * config.hidden_size * config.intermediate_size * config.num_layers,
                       summary=f"{_human(active)}-{_human(total)}")
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write ``domain`` (packed bits) and the domain names to ``path`` (.npz), atomically."""
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, domain=np.packbits(self.domain, axis=-1), shape=np.asarray(self.domain.shape),
                     domains=np.asarray(self.domains, dtype=str))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertMasks":
        with np.load(os.fspath(path)) as z:
            for key in ("domain", "shape", "domains"):
                if key not in z:
                    raise ValueError(f"{path}: not an ExpertMasks file (missing array {key!r})")
            shape = tuple(int(s) for s in z["shape"])
            domain = np.unpackbits(z["domain"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
            return cls(domain=domain, domains=tuple(str(d) for d in z["domains"]))


def build_masks(scores: np.ndarray, keep_ratio: float, *, domains: Sequence[str] | None = None) -> ExpertMasks:
    """scores <float>[E, L, F] (per-domain channel means) -> ExpertMasks keeping round(keep_ratio * F)
    channels per domain and layer. Ties are broken towards the lower channel index (stable sort)."""
    _check_keep_ratio(keep_ratio)
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3:
        raise ValueError(f"build_masks: scores must be [E, L, F], got shape {scores.shape}")
    E, L, F = scores.shape
    if domains is not None and len(domains) != E:
        raise ValueError(f"build_masks: {len(domains)} domain names for scores with E={E}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("build_masks: scores contain NaN or inf")
    k = int(round(keep_ratio * F))
    if k < 1:
        raise ValueError(f"build_masks: keep_ratio={keep_ratio} keeps no channel of F={F}")
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    domain = np.zeros((E, L, F), bool)
    np.put_along_axis(domain, top, True, axis=-1)
    return ExpertMasks(domain=domain, domains=tuple(domains or ()))


def non_ffn_params(config: LlamaConfig) -> int:
    """Embedding (+ untied LM head) + final norm + every layer's attention and norms."""
    D, L = config.hidden_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    embed = config.vocab_size * D * (1 if config.tie_word_embeddings else 2)
    per_layer = D * q + 2 * D * kv + q * D + 2 * D + ((q + 2 * kv) if config.qkv_bias else 0)
    return embed + D + L * per_layer


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
