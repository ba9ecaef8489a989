"""Closed-form refit of the down-projections against numpy.linalg.lstsq on the stacked activations."""

import numpy as np
import pytest

from readme_jax.extract.masks import build_masks
from readme_jax.extract.refit import refit_fused, refit_pruned, refit_tied

E, L, F, D, N, RIDGE = 3, 2, 12, 5, 40, 0.05


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    masks = build_masks(rng.random((E, L, F)), 0.5)
    acts = rng.standard_normal((E, L, N, F)) * rng.random(F) * 2          # per-domain down_proj inputs
    w_down = rng.standard_normal((L, F, D))
    grams = np.einsum("elnf,elng->elfg", acts, acts) / N
    return masks, acts, w_down, grams


def _ridge_rows(a_s, y, w_s, ch, g):
    """Rows appended to a least-squares problem so that it carries the refit's ridge term."""
    lam = RIDGE * np.mean(np.diag(g[np.ix_(ch, ch)]))
    return np.sqrt(lam * N) * np.eye(len(ch)), np.sqrt(lam * N) * w_s


def test_fused_refit_equals_lstsq(problem):
    masks, acts, w_down, grams = problem
    got = refit_fused(w_down, grams, masks, ridge=RIDGE)
    chan = masks.expert_channels()
    for l in range(L):
        for e in range(E):
            ch = chan[l, e]
            a, y = acts[e, l][:, ch], acts[e, l] @ w_down[l]             # the dense output on domain e
            ra, ry = _ridge_rows(a, y, w_down[l][ch], ch, grams[e, l])
            want = np.linalg.lstsq(np.vstack([a, ra]), np.vstack([y, ry]), rcond=None)[0]
            np.testing.assert_allclose(got[l, e], want, rtol=1e-4, atol=1e-5)
    # it reproduces the dense output better than keeping the dense rows
    l, e, ch = 0, 0, chan[0, 0]
    y = acts[e, l] @ w_down[l]
    assert np.linalg.norm(acts[e, l][:, ch] @ got[l, e] - y) < np.linalg.norm(acts[e, l][:, ch] @ w_down[l][ch] - y)


def test_tied_refit_is_joint_lstsq_over_domains(problem):
    """One row per channel; each domain's error is measured with its own expert's channels."""
    masks, acts, w_down, grams = problem
    got = refit_tied(w_down, grams, masks, ridge=RIDGE)
    chan = masks.expert_channels()
    for l in range(L):
        used = np.flatnonzero(masks.domain[:, l].any(0))
        col = {c: i for i, c in enumerate(used)}
        rows_a, rows_y = [], []
        for e in range(E):
            ch = chan[l, e]
            block = np.zeros((N, len(used)))
            block[:, [col[c] for c in ch]] = acts[e, l][:, ch]
            ra, ry = _ridge_rows(None, None, w_down[l][ch], ch, grams[e, l])
            rblock = np.zeros((len(ch), len(used)))
            rblock[:, [col[c] for c in ch]] = ra
            rows_a += [block, rblock]
            rows_y += [acts[e, l] @ w_down[l], ry]
        want = np.linalg.lstsq(np.vstack(rows_a), np.vstack(rows_y), rcond=None)[0]
        np.testing.assert_allclose(got[l][used], want, rtol=1e-4, atol=1e-5)
        unused = np.flatnonzero(~masks.domain[:, l].any(0))
        np.testing.assert_array_equal(got[l][unused], w_down[l][unused].astype(np.float32))


def test_pruned_refit_is_lstsq_over_the_pooled_domains(problem):
    """The equal-size dense baseline's refit: one channel set for all tokens; each domain's rows weighted by
    its token share (sqrt(w_e) on its rows = w_e in the normal equations), the ridge on the pooled Gram."""
    _, acts, w_down, grams = problem
    rng = np.random.default_rng(1)
    channels = np.sort(np.stack([rng.permutation(F)[:F // 2] for _ in range(L)]), axis=1)
    weights = np.array([5.0, 1.0, 2.0])
    got = refit_pruned(w_down, grams, weights, channels, ridge=RIDGE)
    w = weights / weights.sum()
    for l in range(L):
        ch = channels[l]
        a = np.vstack([np.sqrt(w[e]) * acts[e, l][:, ch] for e in range(E)])
        y = np.vstack([np.sqrt(w[e]) * acts[e, l] @ w_down[l] for e in range(E)])
        g = sum(w[e] * grams[e, l] for e in range(E))
        lam = RIDGE * np.mean(np.diag(g[np.ix_(ch, ch)]))
        a = np.vstack([a, np.sqrt(lam * N) * np.eye(len(ch))])
        y = np.vstack([y, np.sqrt(lam * N) * w_down[l][ch]])
        want = np.linalg.lstsq(a, y, rcond=None)[0]
        np.testing.assert_allclose(got[l], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="disagree"):
        refit_pruned(w_down, grams, weights[:2], channels, ridge=RIDGE)


def test_refit_rejects_bad_input(problem):
    masks, _, w_down, grams = problem
    with pytest.raises(ValueError, match="grams"):
        refit_fused(w_down, grams[:, :1], masks, ridge=RIDGE)
    with pytest.raises(ValueError, match="ridge"):
        refit_tied(w_down, grams, masks, ridge=0.0)
