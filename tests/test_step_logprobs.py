"""The packed step's logprobs: the rows that ask get the sampled token's log-probability and the top
MAX_LOGPROBS from one log-softmax of the raw logits, equal (1e-5) to log-softmax of our own full forward; a
greedy token's logprob equals its top-1 entry bit for bit (lm-eval's greediness test); rows that do not ask
are untouched; no compile after warm-up."""

import jax
import numpy as np
import pytest

from readme_jax.model.llama import Llama
from readme_jax.sampling import MAX_LOGPROBS
from readme_jax.serve import paged_runner as pr
from readme_jax.serve.paged_runner import PagedRunner, StepBatch
from tests.test_paged_runner import CFG, PS
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="compiles every bucket of the packed step (warm-up)")


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


def test_step_logprobs_equal_log_softmax_of_forward():
    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)
    runner = PagedRunner(model, num_pages=32, page_size=PS, max_num_seqs=4, max_num_batched_tokens=16,
                         max_model_len=32)
    runner.warmup()
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
