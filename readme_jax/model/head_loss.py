"""Next-token NLL through the LM head without materialising the logits.

``head_nll(x, w, targets)`` = ``-log softmax(x @ head)[target]`` per token, computed in chunks of tokens:
the forward keeps only each token's log-sum-exp, and the hand-written backward recomputes one chunk of
logits at a time (``softmax - onehot`` -> dx, and dW accumulated over chunks). Autodiff of
``log_softmax(x @ head)`` instead keeps [N, V] logits, their exp and a [V, N] transposed copy of their
gradient, plus a scatter for ``take_along_axis``: with SmolLM2's 49k vocabulary that was ~6 s of a 20 s
expert-tuning step on 2 CPU cores and ~1.6 GB of live buffers at 2048 tokens.

``head_grad=False`` skips the head weight gradient (a frozen embedding): one of the backward's three
[C, D] x [D, V] matmuls per chunk.

Training's losses are linear in per-token terms with weights known before the forward (``loss_mask /
count``), so their gradient is computed *in the forward*, each chunk's logits once (``weighted_loss``):
  LM    sum_n a_n NLL_n: dlogits = a_n (softmax(z) - onehot);
  KD    + sum_n b_n T^2 KL(softmax(z_t / T) || softmax(z / T)), the teacher's logits z_t = x_t @ w_t computed
        per chunk from its final hidden states x_t [N, D] (never [N, V]): dlogits += b_n T (softmax(z / T) -
        softmax(z_t / T)).
dlogits give dx [C, D] and the dW contribution right away; the residuals are dx [N, D] and dW, and the
backward only scales them by the incoming cotangent. That drops the logits' recomputation and a second
softmax pass: LM 3 instead of 4 [C, D] x [D, V] matmuls per chunk (measured on the SmolLM2 expert step, 2
cores: ~0.7 s of a 12.5 s step), KD 4 instead of 6 (the teacher's logits are not recomputed either).

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
    return _run(x, w, targets, vocab_major, chunk, head_grad)


def _padded_to_chunks(chunk: int, *arrays):
    """(c, arrays): the chunk size c = min(chunk, N) (>= 1) for arrays [N, ...] and each padded with zero rows to a
    multiple of c."""
    n = arrays[0].shape[0]
    c = max(1, min(chunk, n))
    pad = lambda a: jnp.pad(a, ((0, -n % c),) + ((0, 0),) * (a.ndim - 1))
    return c, tuple(pad(a) for a in arrays)


def weighted_loss(x: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray, nll_weights: jnp.ndarray, *,
                  vocab_major: bool, teacher: tuple[jnp.ndarray, jnp.ndarray] | None = None,
                  kl_weights: jnp.ndarray | None = None, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                  head_grad: bool = True) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(sum_n a_n NLL_n + b_n T^2 KL_n <float32>[], NLL <float32>[N], T^2 KL <float32>[N]) with the sum's
    gradient computed in the forward (module doc); a = ``nll_weights``, b = ``kl_weights`` <float>[N].

    x, w, targets, ``head_grad`` as in :func:`head_nll`; ``teacher`` = (x_t [N, D] the teacher's final-normed
    hidden states, w_t its head in w's layout), neither differentiated; without it KL is 0 and b unused. The
    weights get no gradient (a loss mask over a count), nor do the returned per-token terms (metrics:
    differentiate the sum)."""
    n = x.shape[0]
    kd = teacher is not None
    if kd and kl_weights is None:
        raise ValueError("weighted_loss: a teacher needs kl_weights")
    xt, wt = teacher if kd else (x[:, :0], w[:0])          # without a teacher: empty stand-ins
    b = kl_weights if kd else jnp.zeros((n,), jnp.float32)
    c, (x, targets, a, xt, b) = _padded_to_chunks(chunk, x, targets, nll_weights, xt, b)
    stop = lambda v: jax.lax.stop_gradient(v.astype(jnp.float32))
    teach = (jax.lax.stop_gradient(xt.astype(x.dtype)), jax.lax.stop_gradient(vary_like(wt.astype(x.dtype), x)))
    total, nll, kl = _fused(x, vary_like(w.astype(x.dtype), x), targets.astype(jnp.int32), stop(a), stop(b),
                            teach, (vocab_major, c, head_grad, kd, float(temperature)))
    return total, jax.lax.stop_gradient(nll[:n]), jax.lax.stop_gradient(kl[:n])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(x, w, targets, a, b, teacher, opts):
    return _fused_fwd(x, w, targets, a, b, teacher, opts)[0]


def _fused_fwd(x, w, targets, a, b, teacher, opts):
    vocab_major, c, head_grad, kd, tau = opts
    V = w.shape[0] if vocab_major else w.shape[1]
    wt = teacher[1]

    def body(dw, args):
        xc, tc, ac, bc, xtc = args
        z = _logits(xc, w, vocab_major)                                                  # [C, V]
        m = jnp.max(z, axis=-1, keepdims=True)
        e = jnp.exp(z - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        nll = (m + jnp.log(s))[:, 0] - jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
        hit = jnp.arange(V, dtype=jnp.int32)[None, :] == tc[:, None]
        d = (e * (1.0 / s) - hit) * ac[:, None]                                          # dsum/dlogits
        kl = jnp.zeros_like(nll)
        if kd:
            logq = z / tau - _lse(z / tau)[:, None] if tau != 1.0 else z - (m + jnp.log(s))
            zt = _logits(xtc, wt, vocab_major) / tau
            logp = zt - _lse(zt)[:, None]
            p = jnp.exp(logp)
            kl = jnp.sum(p * (logp - logq), axis=-1) * (tau * tau)
            d = d + (jnp.exp(logq) - p) * (bc * tau)[:, None]
        dx, dw = _head_grads(d.astype(x.dtype), xc, w, dw, vocab_major, head_grad)
        return dw, (nll, kl, dx)

    dw0 = zeros_like_varying(w, jnp.float32) if head_grad else jnp.zeros((), jnp.float32)
    with jax.named_scope("head_loss_fused"):
        dw, (nll, kl, dx) = jax.lax.scan(body, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(a, c),
                                                     _chunks(b, c), _chunks(teacher[0], c)))
    dw = dw.astype(w.dtype) if head_grad else zeros_like_varying(w)
    nll, kl = nll.reshape(-1), kl.reshape(-1)
    return (jnp.sum(nll * a) + jnp.sum(kl * b), nll, kl), (dx.reshape(x.shape), dw, a, b, teacher)


def _fused_bwd(opts, res, g):
    dx, dw, a, b, teacher = res
    g_total = g[0]
    return ((g_total * dx).astype(dx.dtype), (g_total * dw).astype(dw.dtype), None, jnp.zeros_like(a),
            jnp.zeros_like(b), jax.tree.map(jnp.zeros_like, teacher))


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


def _run(x, w, targets, vocab_major, chunk, head_grad):
    n = x.shape[0]
    c, (x, targets) = _padded_to_chunks(chunk, x, targets)
    return _head(x, vary_like(w.astype(x.dtype), x), targets.astype(jnp.int32), (vocab_major, c, head_grad))[:n]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head(x, w, targets, opts):
    return _head_fwd(x, w, targets, opts)[0]


def _head_fwd(x, w, targets, opts):
    vocab_major, c, _ = opts

    def one(args):
        xc, tc = args
        z = _logits(xc, w, vocab_major)
        lse = _lse(z)
        return lse - jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0], lse

    with jax.named_scope("head_loss"):
        nll, lse = jax.lax.map(one, (_chunks(x, c), _chunks(targets, c)))
    return nll.reshape(-1), (x, w, targets, lse.reshape(-1))


def _head_bwd(opts, res, g):
    vocab_major, c, head_grad = opts
    x, w, targets, lse = res
    V = w.shape[0] if vocab_major else w.shape[1]

    def body(dw, args):
        xc, tc, lc, gc = args
        z = _logits(xc, w, vocab_major)
        hit = jnp.arange(V, dtype=jnp.int32)[None, :] == tc[:, None]
        d = (jnp.exp(z - lc[:, None]) - hit) * gc[:, None]                               # dNLL/dlogits [C, V]
        dx, dw = _head_grads(d.astype(x.dtype), xc, w, dw, vocab_major, head_grad)
        return dw, dx

    dw0 = zeros_like_varying(w, jnp.float32) if head_grad else jnp.zeros((), jnp.float32)
    with jax.named_scope("head_loss_bwd"):
        dw, dx = jax.lax.scan(body, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(lse, c), _chunks(g, c)))
    dw = dw.astype(w.dtype) if head_grad else zeros_like_varying(w)
    return dx.reshape(x.shape), dw, None


_head.defvjp(_head_fwd, _head_bwd)
