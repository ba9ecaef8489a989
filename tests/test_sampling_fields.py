"""The per-row logit processors of readme_jax.sampling against NumPy references written from each field's
definition (vLLM / OpenAI), on fixed logits with a different setting per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.errors import SamplingError
from readme_jax.sampling import (SamplingParams, apply_logit_bias, apply_min_p, apply_penalties, apply_top_k,
                                 greedy_tokens, sample_rows, token_counts, token_logprobs)

RNG = np.random.default_rng(0)
B, V = 4, 11
LOGITS = RNG.normal(0, 2, (B, V)).astype(np.float32)
LOGITS[2, 3] = LOGITS[2, 5] = 9.0                       # a tie at the top of row 2


def np_top_k(row, k):
    if k <= 0 or k >= row.size:
        return row.copy()
    kth = np.sort(row)[::-1][k - 1]
    return np.where(row < kth, -np.inf, row)


def np_min_p(row, p):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    return np.where(probs < p * probs.max(), -np.inf, row)


def np_penalties(row, prompt, output, presence, frequency, repetition):
    out = row.astype(np.float64).copy()
    for t in set(prompt) | set(output):                 # repetition: prompt + output tokens
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):                               # frequency / presence: output tokens only
        out[t] -= frequency * output.count(t) + presence
    return out


def test_top_k_per_row():
    k = np.array([1, 3, 2, -1], np.int32)
    got = np.asarray(apply_top_k(LOGITS, k))
    for b in range(B):
        np.testing.assert_array_equal(got[b], np_top_k(LOGITS[b], int(k[b])))
    assert np.isfinite(got[2]).sum() == 2                      # the tie at the top: both kept with k = 2
    np.testing.assert_array_equal(np.asarray(apply_top_k(LOGITS, np.zeros(B, np.int32))), LOGITS)
    wide = RNG.normal(0, 2, (3, 200)).astype(np.float32)                # k up to 64: partial selection; 70: sort
    for ks in ([5, 0, 64], [70, 5, -1]):
        got = np.asarray(apply_top_k(wide, np.array(ks, np.int32)))
        for b in range(3):
            np.testing.assert_array_equal(got[b], np_top_k(wide[b], ks[b]))


def test_min_p_per_row():
    p = np.array([0.0, 0.05, 0.5, 1.0], np.float32)
    got = np.asarray(apply_min_p(LOGITS, p))
    for b in range(B):
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(np_min_p(LOGITS[b], p[b])))
    np.testing.assert_array_equal(got[0], LOGITS[0])
    assert np.isfinite(got[3]).sum() == 1 and np.isfinite(got[1]).sum() > np.isfinite(got[2]).sum()


def test_penalties_on_prompt_and_output_counts():
    prompts = [[1, 2, 2], [0], [4, 5, 6, 7], [3]]
    outputs = [[2, 2, 9], [0, 0, 0], [], [10, 3]]
    T = max(map(len, prompts + outputs))

    def pad(rows):
        ids = np.array([r + [0] * (T - len(r)) for r in rows], np.int32)
        mask = np.array([[True] * len(r) + [False] * (T - len(r)) for r in rows])
        return token_counts(ids, mask, V)

    presence = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    frequency = np.array([0.3, 0.2, 0.0, -0.5], np.float32)
    repetition = np.array([1.3, 1.0, 0.7, 2.0], np.float32)
    got = np.asarray(apply_penalties(LOGITS, pad(prompts), pad(outputs), presence, frequency, repetition))
    for b in range(B):
        want = np_penalties(LOGITS[b], prompts[b], outputs[b], presence[b], frequency[b], repetition[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)
    neutral = apply_penalties(LOGITS, pad(prompts), pad(outputs), np.zeros(B, np.float32), np.zeros(B, np.float32),
                              np.ones(B, np.float32))
    np.testing.assert_array_equal(np.asarray(neutral), LOGITS)


def test_logit_bias_per_row():
    ids = np.array([[3, 7], [0, -1], [-1, -1], [10, 2]], np.int32)
    vals = np.array([[100.0, -5.0], [-100.0, 0.0], [0.0, 0.0], [1.5, 2.5]], np.float32)
    got = np.asarray(apply_logit_bias(LOGITS, ids, vals))
    want = LOGITS.copy()
    for b in range(B):
        for t, v in zip(ids[b], vals[b]):
            if t >= 0:
                want[b, t] += v
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_logprobs_ranks_and_top_logprobs_from_one_log_softmax():
    tokens = np.array([0, 4, 5, 10], np.int32)
    chosen, rank, top_ids, top_lp = (np.asarray(a) for a in token_logprobs(LOGITS, tokens, 3))
    x = LOGITS.astype(np.float64)
    ref = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))
    np.testing.assert_allclose(chosen, ref[np.arange(B), tokens], atol=1e-5)
    logits = LOGITS.astype(np.float64)                      # vLLM's rank: 1 + the tokens strictly more likely
    np.testing.assert_array_equal(rank, 1 + (logits > logits[np.arange(B), tokens][:, None]).sum(-1))
    for b in range(B):
        assert set(top_ids[b]) <= set(np.argsort(-ref[b])[:4])                   # row 2 has a tie
        np.testing.assert_allclose(top_lp[b], np.sort(ref[b])[::-1][:3], atol=1e-5)
        assert list(top_lp[b]) == sorted(top_lp[b], reverse=True)
    greedy = LOGITS.argmax(-1).astype(np.int32)
    g_lp, g_rank, _, g_top = (np.asarray(a) for a in token_logprobs(LOGITS, greedy, 1))
    assert (g_lp == g_top[:, 0]).all() and (g_rank == 1).all()          # bit-identical, as lm-eval compares


@pytest.mark.parametrize("field, value", [
    ("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("repetition_penalty", float("inf")), ("logit_bias", ((3, 101.0),)),
    ("logit_bias", ((-1, 1.0),)), ("logprobs", 21), ("logprobs", True),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_neutral_values_activate_nothing():
    for top_k in (0, -1):
        assert SamplingParams(top_k=top_k, min_p=0, repetition_penalty=1, presence_penalty=0,
                              frequency_penalty=0.0).active_processors() == ()
    p = SamplingParams(top_k=5, repetition_penalty=1.1, logit_bias=((7, 1.0),), logprobs=0)
    assert p.active_processors() == ("top_k", "repetition_penalty", "logit_bias", "logprobs")


def test_sample_rows_draws_inside_top_k_and_min_p():
    """Per row over 200 seeds: a top-k row draws exactly the NumPy top-k set, a min-p row exactly its min-p set
    (cut on the temperature-scaled logits, as vLLM), a greedy row with top-k its argmax, a neutral sampled row
    more than either set; top-k and min-p off (0) change nothing."""
    T = 200
    rows = np.repeat(LOGITS[:1], 4, axis=0)
    temp = np.array([1.0, 0.7, 0.0, 1.0], np.float32)
    top_k = np.array([3, 0, 2, 0], np.int32)
    min_p = np.array([0.0, 0.2, 0.0, 0.0], np.float32)
    draw = jax.jit(sample_rows)
    zeros, ones = np.zeros(4, np.int32), np.ones(4, np.float32)
    tok = np.array([draw(rows, np.full(4, seed, np.int32), zeros, temp, ones, top_k, min_p) for seed in range(T)])
    seen = [set(tok[:, b].tolist()) for b in range(4)]
    for seed in range(5):
        seeds = np.full(4, seed, np.int32)
        np.testing.assert_array_equal(np.asarray(draw(rows, seeds, zeros, temp, ones)),
                                      np.asarray(draw(rows, seeds, zeros, temp, ones, zeros, np.zeros(4, np.float32))))
    assert seen[0] == set(np.flatnonzero(np.isfinite(np_top_k(LOGITS[0], 3))))
    assert seen[1] == set(np.flatnonzero(np.isfinite(np_min_p(LOGITS[0] / 0.7, 0.2))))
    assert seen[2] == {int(LOGITS[0].argmax())}
    assert len(seen[3]) > max(len(seen[0]), len(seen[1]))


def test_greedy_tokens_is_argmax_with_ties_and_masked_rows():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[1, [4, 9, 30]] = 10.0                                   # a tie: the first index wins, as argmax
    logits[2] = -np.inf                                            # everything masked: index 0, as argmax
    logits[3, :] = 0.5                                             # a flat row
    logits[4, 49] = 99.0                                           # the last index
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    assert got.dtype == np.int32
