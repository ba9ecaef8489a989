"""Generation: the jitted cached loop agrees with greedy decoding by full recomputation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.generation import generate_ids, sample_token
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(3))


def greedy_by_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_batched_greedy_matches_full_recompute(model):
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 5, 6, 8, 10, 11], [42]]
    got = generate_ids(model, prompts, 6)
    for prompt, row in zip(prompts, got):
        assert row == greedy_by_recompute(model, prompt, 6)


def test_stops_at_eos(model):
    ref = greedy_by_recompute(model, [5, 9, 13], 6)
    eos = ref[2]
    got = generate_ids(model, [[5, 9, 13]], 6, eos_id=eos)[0]
    assert got == ref[: ref.index(eos) + 1]


def test_sampling_is_seeded(model):
    a = generate_ids(model, [[1, 2, 3]] * 2, 8, temperature=1.0, top_p=0.9, seed=7)
    b = generate_ids(model, [[1, 2, 3]] * 2, 8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]]))
    picks = jax.vmap(lambda k: sample_token(logits, k, jnp.float32(1.0), jnp.float32(0.8)))(
        jax.random.split(jax.random.key(0), 256))
    chex.assert_shape(picks, (256, 1))
    assert set(np.unique(np.asarray(picks))) <= {0, 1}


def test_over_long_request_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_ids(model, [[1] * 100], 64)
