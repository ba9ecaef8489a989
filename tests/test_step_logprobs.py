"""The packed step's sampling side. Logprobs: the rows that ask get the sampled token's log-probability and the
top MAX_LOGPROBS from one log-softmax of the raw logits, equal (1e-5) to log-softmax of our own full forward; a
greedy token's logprob equals its top-1 entry bit for bit (lm-eval's greediness test); rows that do not ask
are untouched. Prompt logprobs equal the forward's too. Logit processors: penalties (counted on the device from
the step's input tokens, prompt and output) and logit_bias give the token ``sample_rows`` draws from the NumPy
reference of vLLM's definitions on the forward's logits; neutral rows keep their tokens. No compile after
warm-up."""

import jax
import numpy as np
import pytest
from flax import nnx

from readme_jax.model.llama import Llama
from readme_jax.sampling import MAX_LOGPROBS, sample_rows
from readme_jax.serve import paged_runner as pr
from readme_jax.serve.paged_runner import PagedRunner, StepBatch
from tests.test_paged_runner import CFG, PS
from tests.test_sampling_fields import np_penalties
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="compiles every bucket of the packed step (warm-up)")


@pytest.fixture(scope="module")
def model():
    return random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)


@pytest.fixture(scope="module")
def runner(model):
    r = PagedRunner(model, num_pages=32, page_size=PS, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32)
    r.warmup()
    return r


def _batch(seqs, want, temps):
    """seqs: [(token ids run this step, tokens already in cache, page table)]."""
    q = [len(t) for t, _, _ in seqs]
    kv = [c + len(t) for t, c, _ in seqs]
    width = max(len(p) for _, _, p in seqs)
    return StepBatch(tokens=np.concatenate([t for t, _, _ in seqs]).astype(np.int32),
                     positions=np.concatenate([np.arange(k - n, k) for n, k in zip(q, kv)]).astype(np.int32),
                     experts=np.full(sum(q), -1, np.int32), q_lens=np.array(q), kv_lens=np.array(kv),
                     page_tables=np.array([p + [0] * (width - len(p)) for _, _, p in seqs]),
                     sample=np.ones(len(seqs), bool), route_next=np.zeros(len(seqs), bool),
                     seeds=np.arange(len(seqs), dtype=np.uint32), temperatures=np.array(temps, np.float32),
                     top_ps=np.ones(len(seqs), np.float32), logprobs=np.array(want, bool))


def test_step_logprobs_equal_log_softmax_of_forward(model, runner):
    before = pr._step._cache_size()
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, CFG.vocab_size, n).tolist() for n in (7, 5, 3))
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # step 1: three prompts, the greedy one and the sampled one ask for logprobs, the middle one does not
    res = runner.step(_batch([(a, 0, tables[0]), (b, 0, tables[1]), (c, 0, tables[2])], [True, False, True],
                             [0.0, 0.0, 0.9])).result()
    seqs = [a + [int(res.tokens[0])], b + [int(res.tokens[1])], c + [int(res.tokens[2])]]
    # step 2: one decode token each, only the second asks
    res2 = runner.step(_batch([([seqs[0][-1]], 7, tables[0]), ([seqs[1][-1]], 5, tables[1]),
                               ([seqs[2][-1]], 3, tables[2])], [False, True, False], [0.0, 0.0, 0.9])).result()
    assert pr._step._cache_size() == before
    for r, row, ids in ((res, 0, seqs[0]), (res, 2, seqs[2]), (res2, 1, seqs[1] + [int(res2.tokens[1])])):
        prefix, tok = ids[:-1], ids[-1]
        ref = np.asarray(jax.nn.log_softmax(model(np.array([prefix]))[0, -1]), np.float64)
        np.testing.assert_allclose(r.logprobs[row], ref[tok], atol=1e-5)
        order = np.argsort(-ref, kind="stable")[:MAX_LOGPROBS]
        np.testing.assert_allclose(r.top_logprobs[row], ref[order], atol=1e-5)
        np.testing.assert_allclose(ref[r.top_ids[row]], ref[order], atol=1e-5)   # ties may swap ids
    assert res.logprobs[0] == res.top_logprobs[0, 0] and res.top_ids[0, 0] == res.tokens[0]   # greedy: exact
    assert np.all(np.isneginf(res.top_logprobs[1])) and np.all(np.isneginf(res2.top_logprobs[[0, 2]]))
    none = runner.step(_batch([([seqs[0][-1]], 7, tables[0])], [False], [0.0]))     # nobody asks
    assert np.all(np.isneginf(none.result().top_logprobs))


@nnx.jit
def _padded(model, ids):
    return model(ids)


def _forward(model, ids, width=64):
    """log-softmax of our own full forward at every position of ``ids`` <f64>[T, V] and the raw last logits (one
    compile: ids right-padded to ``width``, which a causal model never reads back)."""
    x = np.zeros((1, width), np.int32)
    x[0, :len(ids)] = ids
    logits = np.asarray(_padded(model, x)[0, :len(ids)], np.float64)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1)), logits[-1]


_sample = jax.jit(sample_rows)


def test_prompt_logprobs_equal_forward(model, runner):
    """Each token's successor logprob and rank (echo, prompt_logprobs), the prompt in two chunks over two steps
    beside a decode row."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, CFG.vocab_size, 9).tolist(), rng.integers(0, CFG.vocab_size, 4).tolist()
    got = []
    for chunk, done in ((a[:5], 0), (a[5:], 5)):
        batch = _batch([(chunk, done, [1, 2, 3]), (b, 0, [4, 5])], [False, False], [0.0, 0.0])
        n = len(chunk)
        batch.prompt_logprobs = np.array([True, False])
        batch.next_tokens = np.array((a + [0])[done + 1:done + n + 1] + [0] * len(b), np.int32)
        res = runner.step(batch).result()
        got.append((res.prompt_logprobs[:n], res.prompt_top_ids[:n], res.prompt_top_logprobs[:n],
                    res.prompt_ranks[:n]))
    lp = np.concatenate([g[0] for g in got])[:-1]
    ref, _ = _forward(model, a)
    want = ref[np.arange(len(a) - 1), a[1:]]
    np.testing.assert_allclose(lp, want, atol=1e-5)
    rank = np.concatenate([g[3] for g in got])[:-1]
    np.testing.assert_array_equal(rank, 1 + (ref[:-1] > want[:, None] + 1e-5).sum(-1))    # no near-ties here
    top = np.concatenate([g[2] for g in got])
    np.testing.assert_allclose(top[:, 0], ref.max(-1), atol=1e-5)


def test_processors_match_numpy_reference(model, runner):
    """Three sequences over a prefill (one prompt in two chunks) and four decode steps: row 0 greedy with every
    penalty, row 1 neutral, row 2 sampled with logit_bias + repetition + top_k; each step's tokens equal what
    ``sample_rows`` draws from the NumPy-processed logits of our own forward."""
    before = pr._step._cache_size()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (6, 4, 3)]
    tables = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    pres, freq, rep = [0.5, 0.0, 0.0], [0.3, 0.0, 0.0], [1.3, 1.0, 0.7]
    temps, top_k = [0.0, 0.0, 0.9], [0, 0, 5]
    bias = {7: 3.0, 11: -100.0}
    runner.reset_row(0)
    runner.reset_row(2, list(bias), list(bias.values()))
    seqs = [list(p) for p in prompts]
    done = [0, 0, 0]
    plan = [[(0, 4), (1, 4), (2, 3)], [(0, 2)]]             # prefill: row 0's prompt in two chunks
    for step in range(6):
        work = plan[step] if step < 2 else [(i, 1) for i in range(3)]
        batch = _batch([(seqs[i][done[i]:done[i] + n], done[i], tables[i]) for i, n in work],
                       [False] * len(work), [temps[i] for i, _ in work])
        idx = [i for i, _ in work]
        batch.seeds = np.array([11 + i for i in idx], np.uint32)
        batch.proc_rows = np.array([i if i != 1 else -1 for i in idx], np.int32)
        batch.prompt_lens = np.array([len(prompts[i]) for i in idx], np.int32)
        for name, vals in (("presence", pres), ("frequency", freq), ("repetition", rep)):
            setattr(batch, name, np.array([vals[i] for i in idx], np.float32))
        batch.top_ks = np.array([top_k[i] for i in idx], np.int32)
        batch.min_ps = np.zeros(len(idx), np.float32)
        res = runner.step(batch).result()
        for j, (i, n) in enumerate(work):
            done[i] += n
            if done[i] < len(seqs[i]):                       # a prompt chunk that does not sample
                continue
            _, raw = _forward(model, seqs[i])
            out = seqs[i][len(prompts[i]):]
            want = np_penalties(raw, prompts[i], out, pres[i], freq[i], rep[i])
            if i == 2:
                for t, v in bias.items():
                    want[t] += v
            ref = _sample(want[None].astype(np.float32), np.array([11 + i]), np.array([len(seqs[i])]),
                              np.array([temps[i]], np.float32), np.ones(1, np.float32), np.array([top_k[i]]))
            assert int(res.tokens[j]) == int(ref[0]), (step, i)
            if i == 1:
                assert int(res.tokens[j]) == int(raw.argmax())        # neutral: the plain greedy token
            seqs[i].append(int(res.tokens[j]))
    assert pr._step._cache_size() == before
    assert 11 not in seqs[2][len(prompts[2]):]                       # biased by -100: never drawn
