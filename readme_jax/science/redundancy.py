"""Routing redundancy across depth (paper section 2.2, Fig. 2): plug-in statistics of per-layer expert choices.

    counts = transition_counts(ids[l], ids[l + 1], E)       # int64[E, E]
    mi = mutual_information(ids[l], ids[l + 1], E)          # {"mi": bits, "h_a", "h_b", "normalized"}
    paths = routing_paths(ids)                              # distinct per-token paths over the L layers

ids are expert choices int[L, N] (N tokens, layer-major). Entropies and mutual information are plug-in
estimates in bits from the empirical joint distribution of the N tokens: biased upwards by about
(E - 1)^2 / (2 N ln 2) bits for independent choices, which is why the number of tokens is always reported.
"""

from __future__ import annotations

import numpy as np


def transition_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """int64[E, E]: counts[i, j] = tokens with choice i in ``a`` and j in ``b`` (int[N] each)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"transition_counts: {a.shape} vs {b.shape}")
    return np.bincount(a * num_experts + b, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def entropy(p: np.ndarray) -> float:
    """Entropy in bits of a distribution given by counts or probabilities (any shape)."""
    p = np.asarray(p, np.float64).ravel()
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray, num_experts: int) -> dict[str, float]:
    """Plug-in I(A; B) in bits and the entropies: {"mi", "h_a", "h_b", "normalized" (= mi / min(h_a, h_b),
    0 when either is 0), "tokens"}."""
    joint = transition_counts(a, b, num_experts)
    h_a, h_b, h_ab = entropy(joint.sum(1)), entropy(joint.sum(0)), entropy(joint)
    mi = max(h_a + h_b - h_ab, 0.0)
    low = min(h_a, h_b)
    return {"mi": mi, "h_a": h_a, "h_b": h_b, "normalized": mi / low if low > 0 else 0.0,
            "tokens": int(joint.sum())}


def routing_paths(ids: np.ndarray) -> dict[str, float]:
    """Distinct routing paths (one expert per layer, int[L, N]) used by the N tokens vs possible E^L
    (as log10, it does not fit an int64), and the share of tokens on the 10 most common paths."""
    ids = np.asarray(ids)
    L, n = ids.shape
    uniq, counts = np.unique(ids.T, axis=0, return_counts=True)
    e = int(ids.max()) + 1 if ids.size else 0
    top = np.sort(counts)[::-1][:10].sum() / max(n, 1)
    return {"distinct": int(len(uniq)), "tokens": int(n), "log10_possible": float(L * np.log10(max(e, 1))),
            "top10_share": float(top)}


def depth_profile(ids: np.ndarray, num_experts: int) -> list[dict[str, float]]:
    """Mutual information between adjacent layers, one dict per l in [0, L - 1) (ids int[L, N])."""
    ids = np.asarray(ids)
    return [{"layer": l, **mutual_information(ids[l], ids[l + 1], num_experts)} for l in range(ids.shape[0] - 1)]


def locality(ids: np.ndarray) -> float:
    """Share of tokens (with a previous token in the same window) whose expert equals the previous token's:
    ids int[..., W, T] (windows of T tokens); the mean over any leading axes (layers)."""
    ids = np.asarray(ids)
    return float((ids[..., 1:] == ids[..., :-1]).mean())
