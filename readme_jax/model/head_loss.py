"""Next-token NLL through the LM head without materialising the logits.

``head_nll(x, w, targets)`` = ``-log softmax(x @ head)[target]`` per token, computed in chunks of tokens:
the forward keeps only each token's log-sum-exp, and the hand-written backward recomputes one chunk of
logits at a time (``softmax - onehot`` -> dx, and dW accumulated over chunks). Autodiff of
``log_softmax(x @ head)`` instead keeps [N, V] logits, their exp and a [V, N] transposed copy of their
gradient, plus a scatter for ``take_along_axis``: with SmolLM2's 49k vocabulary that was ~6 s of a 20 s
expert-tuning step on 2 CPU cores and ~1.6 GB of live buffers at 2048 tokens.

Distillation (``head_kd``): the same chunked pass also gives each token's forward KL from a teacher's
next-token distribution, ``T^2 KL(softmax(z_t / T) || softmax(z / T))``, the teacher's logits z_t = x_t @ w_t
recomputed per chunk from its final hidden states x_t [N, D] (never [N, V]); its backward adds
``g_kl T (softmax(z / T) - softmax(z_t / T))`` to dNLL/dlogits. ``head_grad=False`` skips the head weight
gradient (a frozen embedding): one of the backward's three [C, D] x [D, V] matmuls per chunk.

Training's LM loss (``weighted_nll``) is linear in the per-token NLL with weights known before the forward
(``loss_mask / count``), so its gradient is computed *in the forward*, each chunk's logits once: dlogits =
(softmax - onehot) * weight gives dx [C, D] and the dW contribution right away; the residuals are dx [N, D]
and dW, and the backward only scales them by the incoming cotangent. That drops the logits' recomputation
and a second softmax pass (3 instead of 4 [C, D] x [D, V] matmuls per chunk; measured on the SmolLM2 expert
step, 2 cores: ~0.7 s of a 12.5 s step).

Dimension names: N tokens, D model, V vocab, C chunk (tokens per chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from readme_jax.model.varying import vary_like, zeros_like_varying

DEFAULT_CHUNK = 512


def nll_from_logits(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """``-log softmax(logits)[target]``: logits [..., V], targets <int>[...] -> <float32>[...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def head_nll(x: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray, *, vocab_major: bool,
             chunk: int = DEFAULT_CHUNK, head_grad: bool = True) -> jnp.ndarray:
    """Per-token NLL of the LM head. <float32>[N].

    x [N, D] final-normed hidden states (compute dtype); targets <int>[N];
    w: the head, [V, D] when ``vocab_major`` (a tied embedding table) else [D, V] (an untied lm_head).
    Logits and the softmax are float32 whatever x's dtype. N need not divide by ``chunk`` (the tail chunk
    is zero-padded; its rows get no gradient). ``head_grad=False``: w gets a zero gradient (not computed).
    """
    return _run(x, w, targets, None, None, vocab_major, chunk, 1.0, head_grad)[0]


def _padded_to_chunks(chunk: int, *arrays):
    """(c, arrays): the chunk size c = min(chunk, N) (>= 1) for arrays [N, ...] and each padded with zero rows to a
    multiple of c (None passes through)."""
    n = arrays[0].shape[0]
    c = max(1, min(chunk, n))
    pad = lambda a: None if a is None else jnp.pad(a, ((0, -n % c),) + ((0, 0),) * (a.ndim - 1))
    return c, tuple(pad(a) for a in arrays)


def weighted_nll(x: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *, vocab_major: bool,
                 chunk: int = DEFAULT_CHUNK, head_grad: bool = True) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum_n weights_n NLL_n <float32>[], NLL <float32>[N]) with the sum's gradient computed in the forward.

    x, w, targets, ``head_grad`` as in :func:`head_nll`; weights <float>[N] get no gradient (a loss mask over
    a count), and neither does the returned per-token NLL (a metric: differentiate the sum)."""
    n = x.shape[0]
    c, (x, targets, weights) = _padded_to_chunks(chunk, x, targets, weights)
    total, nll = _fused(x, vary_like(w.astype(x.dtype), x), targets.astype(jnp.int32),
                        jax.lax.stop_gradient(weights.astype(jnp.float32)), (vocab_major, c, head_grad))
    return total, jax.lax.stop_gradient(nll[:n])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(x, w, targets, weights, opts):
    return _fused_fwd(x, w, targets, weights, opts)[0]


def _fused_fwd(x, w, targets, weights, opts):
    vocab_major, c, head_grad = opts
    V = w.shape[0] if vocab_major else w.shape[1]

    def body(dw, args):
        xc, tc, wc = args
        z = _logits(xc, w, vocab_major)                                                  # [C, V]
        m = jnp.max(z, axis=-1, keepdims=True)
        e = jnp.exp(z - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        nll = (m + jnp.log(s))[:, 0] - jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
        hit = jnp.arange(V, dtype=jnp.int32)[None, :] == tc[:, None]
        d = ((e * (1.0 / s) - hit) * wc[:, None]).astype(x.dtype)                       # dsum/dlogits
        dx, dw = _head_grads(d, xc, w, dw, vocab_major, head_grad)
        return dw, (nll, dx)

    dw0 = zeros_like_varying(w, jnp.float32) if head_grad else jnp.zeros((), jnp.float32)
    with jax.named_scope("head_loss_fused"):
        dw, (nll, dx) = jax.lax.scan(body, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(weights, c)))
    dw = dw.astype(w.dtype) if head_grad else zeros_like_varying(w)
    nll = nll.reshape(-1)
    return (jnp.sum(nll * weights), nll), (dx.reshape(x.shape), dw, weights)


def _fused_bwd(opts, res, g):
    dx, dw, weights = res
    g_total = g[0]
    return (g_total * dx).astype(dx.dtype), (g_total * dw).astype(dw.dtype), None, jnp.zeros_like(weights)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _head_grads(d, xc, w, dw, vocab_major, head_grad):
    """From dlogits d [C, V] (x's dtype): (dx [C, D] in d's dtype, dW accumulated in float32 when ``head_grad``)."""
    dx = jax.lax.dot_general(d, w, (((1,), (0 if vocab_major else 1,)), ((), ())),
                             preferred_element_type=jnp.float32)                        # [C, D]
    if head_grad:
        if vocab_major:   # dW [V, D] = dᵀ x
            dw = dw + jax.lax.dot_general(d, xc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:             # dW [D, V] = xᵀ d
            dw = dw + jax.lax.dot_general(xc, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(d.dtype), dw


def head_kd(x: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray, x_teacher: jnp.ndarray, w_teacher: jnp.ndarray,
            *, vocab_major: bool, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
            head_grad: bool = True) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(NLL <float32>[N], T^2 KL(teacher || student) at temperature T <float32>[N]) per token.

    x, w, targets as in :func:`head_nll`; x_teacher [N, D] the teacher's final-normed hidden states and
    w_teacher its head (same layout, ``vocab_major``); neither gets a gradient."""
    return _run(x, w, targets, x_teacher, w_teacher, vocab_major, chunk, float(temperature), head_grad)


def _run(x, w, targets, xt, wt, vocab_major, chunk, tau, head_grad):
    n = x.shape[0]
    c, (x, targets, xt) = _padded_to_chunks(chunk, x, targets, xt)
    kd = xt is not None
    teacher = (jax.lax.stop_gradient(xt.astype(x.dtype)),
               jax.lax.stop_gradient(vary_like(wt.astype(x.dtype), x))) if kd else (x[:0], w[:0])
    nll, kl = _head(x, vary_like(w.astype(x.dtype), x), targets.astype(jnp.int32), teacher,
                    (vocab_major, c, tau, kd, head_grad))
    return nll[:n], kl[:n]


def _dims(vocab_major: bool):
    """dot_general dimension numbers of logits = x @ head: contract x's D with w's D axis."""
    return (((1,), (1 if vocab_major else 0,)), ((), ()))


def _logits(xc, w, vocab_major):
    return jax.lax.dot_general(xc, w, _dims(vocab_major), preferred_element_type=jnp.float32)   # [C, V]


def _lse(z):
    m = jnp.max(z, axis=-1, keepdims=True)
    return (m + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)))[:, 0]


def _chunks(a, c):
    return a.reshape((a.shape[0] // c, c) + a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head(x, w, targets, teacher, opts):
    return _head_fwd(x, w, targets, teacher, opts)[0]


def _head_fwd(x, w, targets, teacher, opts):
    vocab_major, c, tau, kd, _ = opts
    xt, wt = teacher

    def one(args):
        xc, tc, xtc = args
        z = _logits(xc, w, vocab_major)
        lse = _lse(z)
        nll = lse - jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
        if not kd:
            return nll, jnp.zeros_like(nll), lse, lse, lse
        lse_s = lse if tau == 1.0 else _lse(z / tau)
        zt = _logits(xtc, wt, vocab_major) / tau
        lse_t = _lse(zt)
        logp_t = zt - lse_t[:, None]
        kl = jnp.sum(jnp.exp(logp_t) * (logp_t - (z / tau - lse_s[:, None])), axis=-1) * (tau * tau)
        return nll, kl, lse, lse_s, lse_t

    xts = _chunks(xt, c) if kd else jnp.zeros((x.shape[0] // c, 0), x.dtype)
    with jax.named_scope("head_loss"):
        nll, kl, lse, lse_s, lse_t = jax.lax.map(one, (_chunks(x, c), _chunks(targets, c), xts))
    flat = lambda a: a.reshape(-1)
    return (flat(nll), flat(kl)), (x, w, targets, teacher, flat(lse), flat(lse_s), flat(lse_t))


def _head_bwd(opts, res, g):
    vocab_major, c, tau, kd, head_grad = opts
    x, w, targets, teacher, lse, lse_s, lse_t = res
    xt, wt = teacher
    g_nll, g_kl = g
    V = w.shape[0] if vocab_major else w.shape[1]

    def body(dw, args):
        xc, tc, lc, gc, xtc, lsc, ltc, gkc = args
        z = _logits(xc, w, vocab_major)
        hit = jnp.arange(V, dtype=jnp.int32)[None, :] == tc[:, None]
        d = (jnp.exp(z - lc[:, None]) - hit) * gc[:, None]                               # dNLL/dlogits [C, V]
        if kd:
            q = jnp.exp(z / tau - lsc[:, None])
            p = jnp.exp(_logits(xtc, wt, vocab_major) / tau - ltc[:, None])
            d = d + (q - p) * (gkc * tau)[:, None]
        dx, dw = _head_grads(d.astype(x.dtype), xc, w, dw, vocab_major, head_grad)
        return dw, dx

    n = x.shape[0] // c
    xts = _chunks(xt, c) if kd else jnp.zeros((n, 0), x.dtype)
    dw0 = zeros_like_varying(w, jnp.float32) if head_grad else jnp.zeros((), jnp.float32)
    with jax.named_scope("head_loss_bwd"):
        dw, dx = jax.lax.scan(body, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(lse, c), _chunks(g_nll, c),
                                          xts, _chunks(lse_s, c), _chunks(lse_t, c), _chunks(g_kl, c)))
    dw = dw.astype(w.dtype) if head_grad else zeros_like_varying(w)
    return dx.reshape(x.shape), dw, None, jax.tree.map(jnp.zeros_like, teacher)


_head.defvjp(_head_fwd, _head_bwd)
