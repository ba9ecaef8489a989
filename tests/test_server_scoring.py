"""What a scoring client reads from the server, against our own forward on the same tiny model: completion
logprobs (streamed and not) equal log-softmax of the forward (1e-5) and pass lm-eval's exact greediness test;
echo's prompt logprobs equal ``token_nll`` (lm-eval's loglikelihood payload: token-id prompts in a list,
max_tokens 1, logprobs 1, echo, temperature 0), the same again once the prefix is cached; the logit processors
(penalties, logit_bias, top_k, min_p) give the tokens a NumPy reference of vLLM's definitions gives; and
lm-evaluation-harness's ``local-completions`` scores a local multiple-choice task through the server exactly as
``eval.multiple_choice`` scores it in-process."""

import json

import httpx
import numpy as np
import pytest

from readme_jax.model.llama import Llama
from tests.test_sampling_fields import np_penalties
from tests.test_step_logprobs import _forward as forward
from tests.test_server import CFG, MODEL, Served, byte_tokenizer, make_engine
from tests.tiny_models import random_model

pytestmark = pytest.mark.slow(reason="starts a server whose engine warms up (compiles every bucket)")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    s = Served(*make_engine(tok, max_queue=64), tok)
    yield s
    s.stop()


def model_of(served):
    return served.engine.runner.model


def post(served, body, route="completions"):
    r = httpx.post(f"{served.base}/v1/{route}", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json() if not body.get("stream") else [json.loads(e[6:]) for e in r.text.split("\n\n")
                                                    if e.startswith("data: {")]


def ids_of(tokens) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in tokens]


def test_logprobs_equal_log_softmax_of_forward(served):
    prompt = np.random.default_rng(0).integers(3, CFG.vocab_size, 9).tolist()
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": True,
            "return_tokens_as_token_ids": True}
    lp = post(served, body)["choices"][0]["logprobs"]
    gen = ids_of(lp["tokens"])
    ref = forward(model_of(served), prompt + gen)[0][len(prompt) - 1:-1]
    np.testing.assert_allclose(lp["token_logprobs"], ref[np.arange(5), gen], atol=1e-5)
    for j, top in enumerate(lp["top_logprobs"]):
        assert len(top) == 3 and lp["token_logprobs"][j] == max(top.values())     # lm-eval's exact greedy test
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(ref[j])[::-1][:3], atol=1e-5)
        np.testing.assert_allclose([ref[j][t] for t in ids_of(top)], list(top.values()), atol=1e-5)
    streamed = post(served, body | {"stream": True})
    assert [x for e in streamed for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["token_logprobs"]] \
        == lp["token_logprobs"]
    chat = post(served, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                         "logprobs": True, "top_logprobs": 2, "ignore_eos": True}, "chat/completions")
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content)


def test_echo_prompt_logprobs_equal_token_nll(served, tok):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (21, 6)]       # 21: longer than a chunk
    body = {"prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    model = model_of(served)
    first = post(served, body)
    for p, choice in zip(prompts, first["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(p) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and choice["text"].startswith(tok.decode(p))
        nll = np.asarray(model.token_nll(np.array([p[:-1]]), np.array([p[1:]]))[0], np.float64)
        np.testing.assert_allclose(lp["token_logprobs"][1:len(p)], -nll, atol=1e-5)
    again = post(served, body)                       # the prefixes are cached now: never read for prompt logprobs
    assert [c["logprobs"] for c in again["choices"]] == [c["logprobs"] for c in first["choices"]]
    events = post(served, body | {"prompt": prompts[1], "stream": True})
    assert events[0]["choices"][0]["text"] == tok.decode(prompts[1])
    streamed = events[0]["choices"][0]["logprobs"]["token_logprobs"]
    assert streamed == first["choices"][1]["logprobs"]["token_logprobs"][:-1]


def test_vllm_prompt_logprobs_on_completions_and_chat(served, tok):
    """vLLM's ``prompt_logprobs`` k: per prompt token after the first, {id: {logprob, rank, decoded_token}} with
    the token itself (its logprob the forward's, its rank 1 + the tokens more likely) and its k most likely
    alternatives (ranks 1..k); per choice on completions, once on chat."""
    model = model_of(served)
    p = np.random.default_rng(2).integers(3, CFG.vocab_size, 7).tolist()
    body = {"prompt": p, "temperature": 0, "max_tokens": 1, "prompt_logprobs": 2}
    got = post(served, body)["choices"][0]["prompt_logprobs"]
    ref, _ = forward(model, p)
    assert len(got) == len(p) and got[0] is None
    for j in range(1, len(p)):
        entry, row = got[j], ref[j - 1]
        own = entry[str(p[j])]
        np.testing.assert_allclose(own["logprob"], row[p[j]], atol=1e-5)
        assert own["rank"] == 1 + int((row > row[p[j]] + 1e-5).sum()) and own["decoded_token"] == tok.decode([p[j]])
        assert len(entry) == 2 + (own["rank"] > 2)                   # the token itself is listed once
        alts = sorted((v["rank"], v["logprob"]) for k, v in entry.items() if int(k) != p[j] or own["rank"] <= 2)
        assert [r for r, _ in alts] == [1, 2]
        np.testing.assert_allclose([lp for _, lp in alts], np.sort(row)[::-1][:2], atol=1e-5)
    only = post(served, body | {"prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
    assert [None if e is None else list(e) for e in only] == [None] + [[str(t)] for t in p[1:]]
    echo = post(served, body | {"prompt_logprobs": 0, "echo": True, "logprobs": 1})["choices"][0]
    assert echo["logprobs"]["token_logprobs"][1:len(p)] == [e[str(t)]["logprob"] for e, t in zip(got[1:], p[1:])]
    chat = post(served, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 1},
                "chat/completions")
    plp = chat["prompt_logprobs"]
    assert len(plp) == chat["usage"]["prompt_tokens"] and plp[0] is None and all(1 <= len(e) <= 2 for e in plp[1:])


def reference_tokens(model, prompt, steps, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """Greedy tokens under vLLM's penalties and logit_bias, from our forward and NumPy (test_sampling_fields)."""
    out = []
    for _ in range(steps):
        _, raw = forward(model, prompt + out)
        logits = np_penalties(raw, prompt, out, presence, frequency, repetition)
        for t, v in (bias or {}).items():
            logits[t] += v
        out.append(int(np.argmax(logits)))
    return out


def test_processors_match_numpy_reference(served):
    model = model_of(served)
    prompt = [5, 9, 5, 40, 41, 42, 9, 238, 72, 236, 218, 242, 257, 113, 163]     # its greedy run repeats itself
    base = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}

    def tokens(**kw):
        return ids_of(post(served, base | kw)["choices"][0]["logprobs"]["tokens"])

    greedy = reference_tokens(model, prompt, 8)
    assert tokens() == greedy
    for kw, ref in (({"repetition_penalty": 1.6}, {"repetition": 1.6}),
                    ({"presence_penalty": 1.5, "frequency_penalty": 0.7}, {"presence": 1.5, "frequency": 0.7}),
                    ({"repetition_penalty": 0.8, "logit_bias": {str(greedy[0]): -100, "77": 4.0}},
                     {"repetition": 0.8, "bias": {greedy[0]: -100, 77: 4.0}})):
        want = reference_tokens(model, prompt, 8, **ref)
        assert want != greedy and tokens(**kw) == want, kw
    # top_k 1 and min_p 1 leave only the most likely token: a sampled request becomes greedy
    assert tokens(temperature=1.0, seed=3, top_k=1) == greedy
    assert tokens(temperature=1.0, seed=3, min_p=1.0) == greedy
    assert tokens(temperature=1.0, seed=3) != greedy


def test_lm_eval_local_completions_scores_like_ours(served, tok, tmp_path, monkeypatch):
    """lm-eval 0.4's ``local-completions`` (remote tokenizer: our /tokenize, /detokenize, /tokenizer_info;
    batches of token-id prompts with echo + logprobs) on a local task: each item's choice equals
    ``eval.multiple_choice``'s and each choice's loglikelihood is within 1e-4 of ours (``token_nll``). The task's
    text starts with the BOS token's text, so lm-eval's tokens (no special tokens added) are ours ([bos] + context
    + choice)."""
    from benchmarks import serve_lm_eval as sle
    from readme_jax.eval.multiple_choice import evaluate_items

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = sle.phrase_items(6)
    folder = sle.write_task(tmp_path, items, bos=tok.bos_token)
    scored = sle.score(served.base, MODEL, folder, {"tokenizer_backend": "remote"}, batch_size=4, max_length=256)
    ours = evaluate_items(model_of(served), tok, items, batch_size=4, max_len=256)
    assert len(scored) == len(items)
    for s, r in zip(scored, ours):
        np.testing.assert_allclose(s["logliks"], r.logliks, atol=1e-4)
        assert s["pred"] == r.pred



def test_n_samples_share_the_prompt_pages(served):
    """n = 3 seeded through the server: distinct, reproducible, each equal to a lone request with seed + j."""
    prompt = np.random.default_rng(4).integers(3, CFG.vocab_size, 37).tolist()
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    texts = [c["text"] for c in post(served, body | {"n": 3})["choices"]]
    assert len(set(texts)) == 3
    assert [c["text"] for c in post(served, body | {"n": 3})["choices"]] == texts
    assert [post(served, body | {"seed": 5 + j})["choices"][0]["text"] for j in range(3)] == texts


def test_followers_take_the_prompt_pages_from_the_cache(tok):
    """With a budget that would prefill three samples of one prompt side by side, samples 1 and 2 (``follows``)
    wait for sample 0's prefill, take its two full pages from the prefix cache and copy its partly filled third:
    each prefills only the prompt's last token; the same tokens."""
    from readme_jax.sampling import SamplingParams
    from readme_jax.serve.engine import Engine, EngineConfig

    model = random_model(lambda rngs: Llama(CFG, rngs=rngs), seed=1, std=0.3)
    prompt = np.random.default_rng(4).integers(3, CFG.vocab_size, 21).tolist()

    def run(share):
        eng = Engine(model, tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32,
                                              page_size=8))
        eng.start(warmup=False)
        streams = [eng.submit(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=9 + j, ignore_eos=True),
                              request_id=f"r-{j}", follows="r-0" if share and j else None) for j in range(3)]
        out = [[t for o in s for t in o.token_ids] for s in streams]
        eng.shutdown(5)
        return out, sum(e["prefill_tokens"] for e in eng.step_log), eng.pages.stats.hits

    (alone, prefilled, hits), (shared, prefilled_shared, hits_shared) = run(False), run(True)
    assert shared == alone and hits == 0 and hits_shared == 2 * 2 * 8
    assert prefilled - prefilled_shared == 2 * (len(prompt) - 1)
