"""Training losses against NumPy: the LM loss, the graded top-n indicator, the routing-distillation targets
(from random features and from a dense forward) and the distillation loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.train import losses
from tests.train_parts import random_masks, tiny_dense


def _np_graded(feat: np.ndarray, n: int) -> np.ndarray:
    desc = -np.sort(-feat, axis=-1)
    total = np.zeros_like(feat)
    for r in (n - 1, 4 * n // 5, 3 * n // 5, 2 * n // 5, n // 5):
        r = max(r, 1)
        total += feat > desc[..., r - 1:r]
    return total / (3.0 * n)


def _np_targets(feat: np.ndarray, specific: np.ndarray) -> np.ndarray:
    """feat [B, T, F], specific [E, F] -> dist [B, T, E] (docs/architecture.md, code form)."""
    n = int(specific[0].sum())
    dist = _np_graded(feat.astype(np.float64), n) @ specific.T.astype(np.float64)
    return (dist - dist.mean(-1, keepdims=True)) * 10.0


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_distill(logits, dist, mask):
    E = logits.shape[-1]
    logp = _np_log_softmax(logits.astype(np.float64))
    total = np.zeros(logits.shape[:-1])
    for d in dist:
        hard = np.eye(E)[d.argmax(-1)]
        tgt = 0.5 * hard + 0.5 / E
        soft = np.exp(_np_log_softmax(d))
        total += 0.75 * -(tgt * logp).sum(-1) + 0.25 * -(soft * logp).sum(-1)
    return (total * mask).sum() / mask.sum()



def test_lm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    from readme_jax.model.head_loss import nll_from_logits
    loss, count = losses.lm_loss(nll_from_logits(jnp.asarray(logits), jnp.asarray(targets)), jnp.asarray(mask))
    nll = -np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(count) == mask.sum()


def test_distill_loss_matches_numpy_on_random_arrays():
    rng = np.random.default_rng(1)
    E, L, B, T, F = 4, 3, 2, 6, 48
    masks = random_masks(E, L, F, 0.5)
    specific = masks.specific                                           # [E, L, F]
    feat = rng.normal(size=(L, B, T, F)).astype(np.float32)
    dist = np.stack([np.asarray(losses.layer_targets(jnp.asarray(feat[l]), jnp.asarray(specific[:, l])))
                     for l in range(L)])
    ref = np.stack([_np_targets(feat[l], specific[:, l]) for l in range(L)])
    np.testing.assert_allclose(dist, ref, atol=1e-5)
    logits = rng.normal(size=(B, T, E)).astype(np.float32) * 3
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    got = float(losses.distill_loss(jnp.asarray(logits), jnp.asarray(dist), jnp.asarray(mask)))
    # the loss against the same dist (ties between experts are common in the graded targets; float32 rounding
    # may break them differently from float64, so the argmax is taken on one dist)
    np.testing.assert_allclose(got, _np_distill(logits, dist.astype(np.float64), mask), rtol=1e-5)
    acc = float(losses.router_accuracy(jnp.asarray(logits), jnp.asarray(dist), jnp.asarray(mask)))
    hit = logits.argmax(-1) == dist.sum(0).argmax(-1)
    np.testing.assert_allclose(acc, (hit * mask).sum() / mask.sum(), rtol=1e-6)


def test_graded_indicator_levels():
    feat = jnp.arange(20, dtype=jnp.float32)[None]                      # distinct values 0..19
    th = np.round(np.asarray(losses.graded_topn(feat, 10))[0] * 30, 4)   # x 3N
    # thresholds: 9th, 8th, 6th, 4th, 2nd largest -> the top channel clears all 5, the 2nd clears 4, ...
    assert th[19] == 5 and th[18] == 4 and th[17] == 4 and th[16] == 3 and th[12] == 1 and th[11] == 0


def test_rank_values_host_and_top_k_paths_agree_with_a_sort(monkeypatch):
    """The CPU path (NumPy partition via pure_callback, under jit and inside a scan) and the GPU/TPU path
    (lax.top_k) give the r-th largest values exactly."""
    feat = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4, 50)), jnp.float32)
    ranks = jnp.asarray([1, 7, 7, 20, 33], jnp.int32)
    want = -np.sort(-np.asarray(feat), axis=-1)[..., np.asarray(ranks) - 1]
    scanned = jax.jit(lambda f, r: jax.lax.scan(lambda c, x: (c, losses.rank_values(x, r, 40)), 0, f)[1])
    np.testing.assert_array_equal(scanned(feat, ranks), want)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(losses.rank_values(feat, ranks, 40), want)


def test_router_targets_from_dense_forward_match_numpy():
    dense = tiny_dense()
    masks = random_masks(3, 2, 40, 0.5, seed=3)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=(2, 7)), jnp.int32)
    dist = np.asarray(losses.router_targets(dense, ids, None, jnp.asarray(masks.specific)))
    from readme_jax.model.layers import swiglu_hidden

    def ffn(p, h):
        act = swiglu_hidden(h, p["w_gate"], p["w_up"])
        return act @ p["w_down"], act

    _, _, acts = dense.hidden_states(ids, ffn_fn=ffn)                  # [L, B, T, F]
    ref = np.stack([_np_targets(np.asarray(acts[l]), masks.specific[:, l]) for l in range(2)])
    assert dist.shape == (2, 2, 7, 3)
    np.testing.assert_allclose(dist, ref, atol=1e-4)
