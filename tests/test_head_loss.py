"""The LM head's chunked NLL (model/head_loss.py) equals autodiff of log_softmax(x @ head), values and
gradients, for tied ([V, D]) and untied ([D, V]) heads, token counts that are not a multiple of the chunk,
and through the models' ``token_nll``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from readme_jax.model.head_loss import head_nll, nll_from_logits, weighted_loss

N, D, V = 37, 12, 50


def _inputs(vocab_major, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (N, D), dtype)
    w = jax.random.normal(k[1], (V, D) if vocab_major else (D, V), dtype) * 0.5
    t = jax.random.randint(k[2], (N,), 0, V)
    g = jax.random.uniform(k[3], (N,))                     # a weighted sum exercises the per-token cotangent
    return x, w, t, g


def _reference(x, w, t, vocab_major):
    logits = x @ (w.T if vocab_major else w)
    return nll_from_logits(logits, t)


class HeadNllTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, 8), (False, 8), (True, 64), (False, 5))
    def test_values_and_grads_match_autodiff(self, vocab_major, chunk):
        x, w, t, g = _inputs(vocab_major)
        ours = self.variant(lambda x, w: head_nll(x, w, t, vocab_major=vocab_major, chunk=chunk))
        chex.assert_shape(ours(x, w), (N,))
        chex.assert_trees_all_close(ours(x, w), _reference(x, w, t, vocab_major), rtol=1e-5, atol=1e-5)
        grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * g), argnums=(0, 1))(x, w)
        chex.assert_trees_all_close(grad(ours), grad(lambda x, w: _reference(x, w, t, vocab_major)),
                                    rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, 8, True), (False, 8, True), (True, 64, True), (False, 5, False),
                              (True, 5, False))
    def test_weighted_sum_gradient_from_the_forward_matches_autodiff(self, vocab_major, chunk, head_grad):
        x, w, t, g = _inputs(vocab_major)
        ref = lambda x, w: jnp.sum(_reference(x, w, t, vocab_major) * g)
        ours = lambda x, w: weighted_loss(x, w, t, g, vocab_major=vocab_major, chunk=chunk, head_grad=head_grad)[:2]
        total, nll = self.variant(ours)(x, w)
        chex.assert_trees_all_close(total, ref(x, w), rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(nll, _reference(x, w, t, vocab_major), rtol=1e-5, atol=1e-5)
        # scaled by an outer factor (the backward multiplies the forward's gradients by the cotangent)
        got = self.variant(jax.grad(lambda x, w: 3.0 * ours(x, w)[0], argnums=(0, 1)))(x, w)
        want = jax.grad(lambda x, w: 3.0 * ref(x, w), argnums=(0, 1))(x, w)
        chex.assert_trees_all_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        if head_grad:
            chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        else:
            assert not np.any(got[1])
        # the returned per-token NLL is a metric: no gradient flows through it
        assert not np.any(jax.grad(lambda x: jnp.sum(ours(x, w)[1]))(x))

    def test_bfloat16_inputs_give_float32_nll_close_to_float32(self):
        x, w, t, _ = _inputs(True)
        got = head_nll(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), t, vocab_major=True, chunk=16)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, _reference(x, w, t, True), rtol=0.05, atol=0.05)


def test_token_nll_of_both_models_matches_their_logits():
    from readme_jax.model.config import LlamaConfig
    from readme_jax.model.llama import Llama
    from tests.tiny_models import random_model
    rng = np.random.default_rng(0)
    for tied in (True, False):
        cfg = LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=tied)
        model = random_model(lambda rngs: Llama(cfg, rngs=rngs), std=0.5)
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
        targets = jnp.roll(ids, -1, axis=1)
        chex.assert_trees_all_close(model.token_nll(ids, targets), nll_from_logits(model(ids), targets),
                                    rtol=1e-5, atol=1e-5)
