"""Generation: the jitted cached loop agrees with greedy decoding by full recomputation, sampling draws
from the model's distribution, and bad settings are refused naming the field."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.errors import SamplingError
from readme_jax.generate import main as generate_main
from readme_jax.generation import generate_ids
from readme_jax.sampling import sample_token
from tests.tiny_models import TINY_DENSE, greedy_by_recompute

@pytest.fixture(scope="module")
def model(tiny_dense):
    return tiny_dense


def test_batched_greedy_matches_full_recompute(model):
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 5, 6, 8, 10, 11], [42]]
    assert generate_ids(model, prompts, 6) == greedy_by_recompute(model, prompts, 6)


def test_stops_at_eos(model):
    ref = greedy_by_recompute(model, [[5, 9, 13]], 6)[0]
    eos = ref[2]
    got = generate_ids(model, [[5, 9, 13]], 6, eos_id=eos)[0]
    assert got == ref[: ref.index(eos) + 1]


def test_sampling_is_seeded(model):
    a = generate_ids(model, [[1, 2, 3]] * 2, 8, temperature=1.0, top_p=0.9, seed=7)
    b = generate_ids(model, [[1, 2, 3]] * 2, 8, temperature=1.0, top_p=0.9, seed=7)
    c = generate_ids(model, [[1, 2, 3]] * 2, 8, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_sampled_frequencies_follow_the_softmax_and_greedy_is_the_argmax():
    """N rows of one logits vector: the token frequencies are softmax(logits / T) (total variation < 0.05;
    greedy, one token for every row, would be ~1 - max p > 0.5 away)."""
    n, V = 8192, 64
    logits = jax.random.normal(jax.random.key(1), (V,))
    rows = jnp.broadcast_to(logits, (n, V))
    sample = jax.jit(sample_token)
    for temperature in (1.0, 0.5):
        probs = np.asarray(jax.nn.softmax(logits / temperature))
        sampled = np.asarray(sample(rows, jax.random.key(2), jnp.float32(temperature), jnp.float32(1.0)))
        freq = np.bincount(sampled, minlength=V) / n
        assert 1 - probs.max() > 0.5
        assert 0.5 * np.abs(freq - probs).sum() < 0.05
    greedy = np.asarray(sample(rows, jax.random.key(2), jnp.float32(0.0), jnp.float32(1.0)))
    assert (greedy == int(jnp.argmax(logits))).all()


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]]))
    picks = jax.vmap(lambda k: sample_token(logits, k, jnp.float32(1.0), jnp.float32(0.8)))(
        jax.random.split(jax.random.key(0), 256))
    chex.assert_shape(picks, (256, 1))
    assert set(np.unique(np.asarray(picks))) <= {0, 1}


def test_nucleus_floor_equals_the_sorted_definition():
    """The bisected floor (sampling._nucleus_floor) equals the sort-based definition on 240 random rows (one
    call) with various spreads, ties, and tokens already cut to -inf: the smallest logit whose strictly more
    likely tokens hold < top_p."""
    from readme_jax.sampling import _nucleus_floor
    rng = np.random.default_rng(0)
    R, V = 240, 300
    x = rng.normal(0, 1, (R, V)) * rng.uniform(0.1, 8, (R, 1))
    for r in range(R):
        if r % 3 == 0:
            x[r, :V // 3] = np.round(x[r, :V // 3])                    # ties
        if r % 5 == 0:
            x[r, rng.permutation(V)[:int(rng.integers(0, V - 1))]] = -np.inf    # cut by top-k / min-p
    x = x.astype(np.float32)
    top_p = rng.uniform(0.05, 0.999, R).astype(np.float32)
    got = np.asarray(_nucleus_floor(jnp.asarray(x), jnp.asarray(top_p)))
    for r in range(R):
        xs = x[r].astype(np.float64)
        p = np.exp(xs - xs.max())
        p /= p.sum()
        before = np.array([p[xs > v].sum() for v in xs])
        want = xs[before < top_p[r]].min()
        on_edge = np.isclose(before[xs == want].min(), top_p[r], atol=1e-5)    # f32 vs f64 mass at the cut
        assert got[r] == np.float32(want) or on_edge, (r, got[r], want)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_tokens"),
    (dict(seed=1.5), "seed"),
])
def test_bad_sampling_settings_name_the_field(model, kwargs, field):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(SamplingError, match=f"^{field}: expected") as e:
        generate_ids(model, [[1, 2]], **args)
    assert e.value.param == field


def test_cli_reports_a_bad_setting_in_one_line_before_loading(capsys, tmp_path):
    rc = generate_main(["--model", str(tmp_path / "absent"), "--top-p", "0", "hello"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    assert err.startswith("error: top_p: expected a number in (0, 1], got 0.0") and "--top-p" in err


def test_over_long_request_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_ids(model, [[1] * (TINY_DENSE.max_position_embeddings - 63)], 64)


def test_readme_jax_generate_stays_the_function_after_the_cli_is_imported(model):
    """``readme_jax.generate`` is the function and ``python -m readme_jax.generate`` the CLI: importing the CLI
    module (as this file does) must not turn the package attribute into something that cannot be called."""
    import readme_jax
    import readme_jax.generate  # noqa: F401 - binds the package attribute to the CLI module
    from readme_jax.generation import generate

    class Tok:
        bos_id, eos_id, pad_id, add_bos_default = None, None, 0, False

        def encode_batch(self, texts, bos=False):
            return [[1 + len(t) % 60, 2, 3] for t in texts]

        def decode(self, ids):
            return " ".join(map(str, ids))

    assert readme_jax.generate(model, Tok(), "ab", 4) == generate(model, Tok(), "ab", 4)
