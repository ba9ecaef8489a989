"""Distillation through the chunked LM head (model/head_loss.head_kd) against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model.head_loss import head_kd, head_nll

N, D, V = 21, 6, 40


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_kd(x, w, t, xt, wt, tau):
    """(nll, T^2 KL(teacher || student)) and d(0.3 nll + 0.7 kl)/dx, /dw in float64; w [V, D]."""
    z, zt = x @ w.T, xt @ wt.T
    logq, logp = _log_softmax(z / tau), _log_softmax(zt / tau)
    nll = -_log_softmax(z)[np.arange(len(t)), t]
    kl = (np.exp(logp) * (logp - logq)).sum(-1) * tau * tau
    dz = 0.3 * (np.exp(_log_softmax(z)) - np.eye(V)[t]) + 0.7 * tau * (np.exp(logq) - np.exp(logp))
    return nll, kl, dz @ w, dz.T @ x


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_head_kd_matches_numpy(tau):
    rng = np.random.default_rng(int(tau))
    x, xt = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    w, wt = rng.standard_normal((V, D)), rng.standard_normal((V, D))
    t = rng.integers(0, V, N)
    want = _numpy_kd(x, w, t, xt, wt, tau)
    f32 = lambda a: jnp.asarray(a, jnp.float32)

    def loss(x, w):
        nll, kl = head_kd(x, w, jnp.asarray(t), f32(xt), f32(wt), vocab_major=True, temperature=tau, chunk=8)
        return 0.3 * jnp.sum(nll) + 0.7 * jnp.sum(kl), (nll, kl)

    (_, (nll, kl)), (dx, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(f32(x), f32(w))
    for got, ref in zip((nll, kl, dx, dw), want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(kl) >= -1e-5)
    # the teacher itself has zero KL
    _, kl_self = head_kd(f32(xt), f32(wt), jnp.asarray(t), f32(xt), f32(wt), vocab_major=True, temperature=tau)
    np.testing.assert_allclose(np.asarray(kl_self), 0.0, atol=1e-5)


def test_untied_head_layout_and_no_head_grad():
    rng = np.random.default_rng(3)
    x, xt, w, wt = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((N, D), (N, D), (V, D), (V, D)))
    t = jnp.asarray(rng.integers(0, V, N))
    a = head_kd(x, w, t, xt, wt, vocab_major=True, chunk=4)
    b = head_kd(x, w.T, t, xt, wt.T, vocab_major=False, chunk=4)            # lm_head [D, V]
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
    gw = jax.grad(lambda w: jnp.sum(head_nll(x, w, t, vocab_major=True, head_grad=False)))(w)
    assert float(jnp.abs(gw).max()) == 0.0
    gx_frozen = jax.grad(lambda x: jnp.sum(head_nll(x, w, t, vocab_major=True, head_grad=False)))(x)
    gx = jax.grad(lambda x: jnp.sum(head_nll(x, w, t, vocab_major=True)))(x)
    np.testing.assert_allclose(np.asarray(gx_frozen), np.asarray(gx), rtol=1e-6)
