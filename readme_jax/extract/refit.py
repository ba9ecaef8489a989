"""Closed-form refit of the experts' down-projections (method step 3, a departure: docs/architecture.md).

Dropping half of a layer's channels changes its FFN output; with the kept channels' inputs fixed, the
down-projection that best reproduces the dense output on the calibration tokens is a least-squares problem
whose normal equations need only the Gram matrix of the down_proj inputs, accumulated in the statistics
pass (``stats.domain_statistics(gram=True)``): with a = the dense down_proj input [N, F] of a domain's
tokens, G = aᵀa / N [F, F], the dense output is y = a W, W = w_down [F, D], and expert e keeps channels S:

    min_V ||a_S V - a W||² / N + ridge * s * ||V - W_S||²   ->   (G_SS + ridge s I) V = G_S: W + ridge s W_S

s = mean diagonal of G_SS (so ``ridge`` is scale-free); the ridge pulls towards the dense rows, not to 0.

* ``fused`` experts: one solve per (layer, expert) over its domain's Gram -> [L, E, Fe, D].
* ``pruned`` dense FFN (the equal-size dense baseline, ``science dense_baseline``): one channel set per layer
  for every token, fitted on the Gram of all domains together (the token-weighted mean of theirs) -> [L, Fe, D].
* ``tied`` channel tables: every channel has one row, shared by the experts that hold it, so the rows are
  fitted jointly: the sum over domains of each domain's error with its own expert,
  (sum_e P_e (G_e,SS + ridge s_e I) P_eᵀ) V = sum_e P_e (G_e,S: W + ridge s_e W_S) -> [L, F, D] (a channel no
  expert holds keeps its dense row). Shared channels are thus fitted over all domains, specific ones over
  the domains that hold them.

Letters: E experts, L layers, F dense channels, Fe channels per expert, D model.
"""

from __future__ import annotations

import numpy as np

from readme_jax.extract.masks import ExpertMasks


def _check(w_down: np.ndarray, grams: np.ndarray, masks: ExpertMasks, ridge: float) -> None:
    E, L, F = masks.domain.shape
    if w_down.shape[:2] != (L, F) or grams.shape != (E, L, F, F):
        raise ValueError(f"refit: w_down is {w_down.shape} and grams {grams.shape}; the masks want w_down "
                         f"[L={L}, F={F}, D] and grams [E={E}, L, F, F]")
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"refit: ridge must be a finite value > 0, got {ridge}")


def _system(g: np.ndarray, w: np.ndarray, ch: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(A [Fe, Fe], B [Fe, D]) of one expert's ridge normal equations in float64."""
    a = g[np.ix_(ch, ch)].astype(np.float64)
    lam = ridge * max(float(np.mean(np.diag(a))), 1e-12)
    a[np.diag_indices_from(a)] += lam
    b = g[ch].astype(np.float64) @ w.astype(np.float64) + lam * w[ch].astype(np.float64)
    return a, b


def refit_fused(w_down: np.ndarray, grams: np.ndarray, masks: ExpertMasks, *, ridge: float) -> np.ndarray:
    """w_down [L, F, D] (dense), grams [E, L, F, F] (mean actᵀ act per domain) -> experts' w_down [L, E, Fe, D]."""
    w_down, grams = np.asarray(w_down), np.asarray(grams)
    _check(w_down, grams, masks, ridge)
    chan = masks.expert_channels()                                                      # [L, E, Fe]
    L, E, Fe = chan.shape
    out = np.empty((L, E, Fe, w_down.shape[-1]), np.float32)
    for l in range(L):
        for e in range(E):
            out[l, e] = np.linalg.solve(*_system(grams[e, l], w_down[l], chan[l, e], ridge))
    return out


def refit_tied(w_down: np.ndarray, grams: np.ndarray, masks: ExpertMasks, *, ridge: float) -> np.ndarray:
    """w_down [L, F, D] (dense), grams [E, L, F, F] -> the tied table w_down [L, F, D], every channel's row
    fitted jointly over the domains whose experts hold it."""
    w_down, grams = np.asarray(w_down), np.asarray(grams)
    _check(w_down, grams, masks, ridge)
    chan = masks.expert_channels()
    L, E, _ = chan.shape
    F = w_down.shape[1]
    out = np.asarray(w_down, np.float32).copy()
    for l in range(L):
        a_all = np.zeros((F, F))
        b_all = np.zeros((F, w_down.shape[-1]))
        for e in range(E):
            ch = chan[l, e]
            a, b = _system(grams[e, l], w_down[l], ch, ridge)
            a_all[np.ix_(ch, ch)] += a
            b_all[ch] += b
        used = masks.domain[:, l].any(0)
        idx = np.flatnonzero(used)
        out[l, idx] = np.linalg.solve(a_all[np.ix_(idx, idx)], b_all[idx])
    return out


def refit_pruned(w_down: np.ndarray, grams: np.ndarray, weights: np.ndarray, channels: np.ndarray, *,
                 ridge: float) -> np.ndarray:
    """w_down [L, F, D] (dense), grams [E, L, F, F] (per domain), weights [E] (each domain's share of the
    tokens), channels <int>[L, Fe] (kept per layer) -> the pruned FFN's w_down [L, Fe, D], each layer solved on
    the pooled Gram sum_e weights[e] grams[e, l]."""
    w_down, channels = np.asarray(w_down), np.asarray(channels)
    w = np.asarray(weights, np.float64)
    E, L, F = grams.shape[0], w_down.shape[0], w_down.shape[1]
    if grams.shape != (E, L, F, F) or w.shape != (E,) or channels.ndim != 2 or channels.shape[0] != L:
        raise ValueError(f"refit_pruned: w_down {w_down.shape}, grams {grams.shape}, weights {w.shape} and channels "
                         f"{channels.shape} disagree (want [L, F, D], [E, L, F, F], [E], [L, Fe])")
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"refit: ridge must be a finite value > 0, got {ridge}")
    w = w / w.sum()
    out = np.empty((L, channels.shape[1], w_down.shape[-1]), np.float32)
    for l in range(L):
        g = sum(w[e] * np.asarray(grams[e, l], np.float64) for e in range(E))
        out[l] = np.linalg.solve(*_system(g, w_down[l], channels[l], ridge))
    return out


def apply_refit(model, dense_w_down: np.ndarray, grams: np.ndarray, masks: ExpertMasks, *, ridge: float) -> None:
    """Replace the down-projections of a freshly extracted ReadMe (tied tables or fused experts) in place."""
    import jax.numpy as jnp   # model weights only here; the solves above are NumPy
    fit = refit_tied if model.tied else refit_fused
    w = model.experts.w_down
    w.set_value(jnp.asarray(fit(dense_w_down, grams, masks, ridge=ridge), w[...].dtype))
