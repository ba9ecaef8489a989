"""Distillation through the chunked LM head (model/head_loss.weighted_loss with a teacher) against a NumPy
reference: values and the gradient computed in the forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model.head_loss import head_nll, weighted_loss

N, D, V = 21, 6, 40


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_kd(x, w, t, xt, wt, tau, a, b):
    """(nll, T^2 KL(teacher || student)) and d(sum a nll + b kl)/dx, /dw in float64; w [V, D]."""
    z, zt = x @ w.T, xt @ wt.T
    logq, logp = _log_softmax(z / tau), _log_softmax(zt / tau)
    nll = -_log_softmax(z)[np.arange(len(t)), t]
    kl = (np.exp(logp) * (logp - logq)).sum(-1) * tau * tau
    dz = a[:, None] * (np.exp(_log_softmax(z)) - np.eye(V)[t]) + (b * tau)[:, None] * (np.exp(logq) - np.exp(logp))
    return nll, kl, dz @ w, dz.T @ x


def _kd(x, w, t, xt, wt, a, b, **kw):
    return weighted_loss(x, w, t, a, teacher=(xt, wt), kl_weights=b, **kw)


@pytest.mark.parametrize("tau,chunk", [(1.0, 8), (2.0, 8), (2.0, 64)])
def test_weighted_kd_matches_numpy(tau, chunk):
    rng = np.random.default_rng(int(tau))
    x, xt = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    w, wt = rng.standard_normal((V, D)), rng.standard_normal((V, D))
    t = rng.integers(0, V, N)
    a, b = 0.3 * rng.uniform(size=N), 0.7 * rng.uniform(size=N)        # per-token weights (a loss mask / count)
    nll_ref, kl_ref, dx_ref, dw_ref = _numpy_kd(x, w, t, xt, wt, tau, a, b)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    loss = lambda x, w: _kd(x, w, jnp.asarray(t), f32(xt), f32(wt), f32(a), f32(b), vocab_major=True,
                            temperature=tau, chunk=chunk)
    total, nll, kl = jax.jit(loss)(f32(x), f32(w))
    np.testing.assert_allclose(float(total), float(np.sum(a * nll_ref + b * kl_ref)), rtol=2e-5)
    for got, ref in ((nll, nll_ref), (kl, kl_ref)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-5)
    # the sum's gradient (from the forward) scaled by an outer cotangent; the per-token terms carry none
    dx, dw = jax.jit(jax.grad(lambda x, w: 2.5 * loss(x, w)[0], (0, 1)))(f32(x), f32(w))
    np.testing.assert_allclose(np.asarray(dx), 2.5 * dx_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dw), 2.5 * dw_ref, rtol=2e-4, atol=2e-5)
    assert not np.any(jax.grad(lambda x: jnp.sum(loss(x, f32(w))[2]))(f32(x)))
    assert np.all(np.asarray(kl) >= -1e-5)
    # the teacher itself has zero KL
    _, _, kl_self = _kd(f32(xt), f32(wt), jnp.asarray(t), f32(xt), f32(wt), f32(a), f32(b), vocab_major=True,
                        temperature=tau)
    np.testing.assert_allclose(np.asarray(kl_self), 0.0, atol=1e-5)


def test_untied_head_layout_and_no_head_grad():
    rng = np.random.default_rng(3)
    x, xt, w, wt = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((N, D), (N, D), (V, D), (V, D)))
    t = jnp.asarray(rng.integers(0, V, N))
    a, b = jnp.full((N,), 0.4), jnp.full((N,), 0.6)
    tied = _kd(x, w, t, xt, wt, a, b, vocab_major=True, chunk=4)
    untied = _kd(x, w.T, t, xt, wt.T, a, b, vocab_major=False, chunk=4)            # lm_head [D, V]
    for u, v in zip(tied, untied):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
    gw = jax.grad(lambda w: _kd(x, w, t, xt, wt, a, b, vocab_major=True, head_grad=False)[0])(w)
    assert float(jnp.abs(gw).max()) == 0.0
    gx_frozen = jax.grad(lambda x: _kd(x, w, t, xt, wt, a, b, vocab_major=True, head_grad=False)[0])(x)
    gx = jax.grad(lambda x: _kd(x, w, t, xt, wt, a, b, vocab_major=True)[0])(x)
    np.testing.assert_allclose(np.asarray(gx_frozen), np.asarray(gx), rtol=1e-6)
    gw = jax.grad(lambda w: jnp.sum(head_nll(x, w, t, vocab_major=True, head_grad=False)))(w)
    assert float(jnp.abs(gw).max()) == 0.0


def test_a_teacher_needs_kl_weights():
    x = jnp.zeros((N, D))
    with pytest.raises(ValueError, match="kl_weights"):
        weighted_loss(x, jnp.zeros((V, D)), jnp.zeros(N, jnp.int32), jnp.ones(N), vocab_major=True,
                      teacher=(x, jnp.zeros((V, D))))
