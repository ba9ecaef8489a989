"""Grain pipelines (packing, determinism, resume, mixing) and the perplexity protocol."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.data.corpus import build_corpus
from readme_jax.data.pipeline import lm_dataset, mixed_dataset, num_sequences, tokenize_stream
from readme_jax.eval.perplexity import evaluate_perplexity, heldout_windows, shuffle_words, text_perplexity


class IntTokenizer:
    """Stand-in tokenizer: a document is whitespace-separated integer ids ("5 6 7" -> [5, 6, 7])."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 1000
    fingerprint = "int-stand-in"  # the token-cache key (real tokenizers are fingerprinted on a probe text)

    def encode(self, text, *, bos=False, eos=False):
        return [1] * bos + [int(w) for w in text.split()] + [2] * eos

    def encode_batch(self, texts, *, bos=False, eos=False):
        return [self.encode(t, bos=bos, eos=eos) for t in texts]


TOK = IntTokenizer()


def _docs(n, lo=10, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(map(str, rng.integers(lo, lo + 100, rng.integers(3, 40)))) for _ in range(n)]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_packing_worked_example():
    """The example of the pipeline module docstring, number for number."""
    docs = ["5 6 7", "8 9", "10 11 12 13"]
    np.testing.assert_array_equal(tokenize_stream(docs, TOK), [1, 5, 6, 7, 2, 1, 8, 9, 2, 1, 10, 11, 12, 13, 2])
    ds = lm_dataset(docs, None, "train", TOK, seq_len=4, batch_size=3, seed=0, shuffle=False, num_epochs=1)
    (batch,) = list(ds)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "input_ids": (np.int32, (3, 4)), "targets": (np.int32, (3, 4)), "loss_mask": (np.float32, (3, 4))}
    np.testing.assert_array_equal(batch["input_ids"], [[1, 5, 6, 7], [2, 1, 8, 9], [2, 1, 10, 11]])
    np.testing.assert_array_equal(batch["targets"], [[5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
    # targets are the inputs shifted left by one, across batch rows too (no token lost or repeated)
    np.testing.assert_array_equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["input_ids"][1:, 0], batch["targets"][:-1, -1])
    assert num_sequences(15, 4) == 3 and num_sequences(13, 4) == 3 and num_sequences(12, 4) == 2
    # without BOS: ids + [eos] per document, nothing masked
    (nb,) = list(lm_dataset(docs, None, "train", TOK, 4, 2, 0, shuffle=False, num_epochs=1, bos=False))
    np.testing.assert_array_equal(nb["input_ids"], [[5, 6, 7, 2], [8, 9, 2, 10]])
    assert nb["loss_mask"].min() == 1


def test_shuffle_is_deterministic_by_seed_and_a_permutation():
    docs = _docs(300)
    make = lambda seed, b=4, **kw: lm_dataset(docs, None, "train", TOK, 16, b, seed, **kw)  # noqa: E731
    a, b, c = (_take(iter(make(s)), 6) for s in (7, 7, 8))
    assert _same(a, b) and not _same(a, c)
    make = lambda seed, **kw: lm_dataset(docs, None, "train", TOK, 16, 1, seed, **kw)  # noqa: E731
    one_pass = list(make(7, num_epochs=1))
    plain = list(make(7, num_epochs=1, shuffle=False))
    rows = lambda bs: sorted(map(tuple, np.concatenate([x["input_ids"] for x in bs])))  # noqa: E731
    assert rows(one_pass) == rows(plain) and not _same(one_pass, plain)
    # a second epoch is a different permutation of the same sequences
    n = len(one_pass)
    two = _take(iter(make(7)), 2 * n)
    assert _same(two[:n], one_pass) and rows(two[n:]) == rows(plain) and not _same(two[n:], one_pass)


@pytest.mark.parametrize("mixed", [False, True])
def test_resume_from_state_yields_the_next_batches(mixed):
    if mixed:
        ds = mixed_dataset({"a": _docs(200), "b": _docs(100, lo=500)}, TOK, 16, 4, seed=3)
    else:
        ds = lm_dataset(_docs(200), None, "train", TOK, 16, 4, seed=3)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip (orbax stores it)
    expected = _take(it, 2)
    it2 = iter(ds)
    it2.set_state(state)
    assert _same(_take(it2, 2), expected)


def test_mixed_dataset_domain_ids_and_proportions():
    # domain a uses ids 10..109, b uses 500..599: every row's tokens tell its domain
    src = {"a": _docs(300), "b": _docs(100, lo=500)}
    batches = _take(iter(mixed_dataset(src, TOK, 16, 8, seed=0)), 40)
    dom = np.concatenate([b["domain"] for b in batches])
    assert batches[0]["domain"].dtype == np.int32 and batches[0]["domain"].shape == (8,)
    ids = np.concatenate([b["input_ids"] for b in batches])
    content = ids[ids > 2].reshape(-1)  # sanity: there are content tokens
    assert content.size
    for row, d in zip(ids, dom):
        toks = row[row > 2]
        assert ((toks >= 500) == bool(d)).all()
    share_b = dom.mean()
    assert 0.15 < share_b < 0.4  # ~ b's share of the sequences (natural mixture)
    equal = np.concatenate([b["domain"] for b in _take(iter(mixed_dataset(src, TOK, 16, 8, 0, weights=[1, 1])), 40)])
    assert 0.4 < equal.mean() < 0.6
    # a subset keeps the domain's index in the full domain list
    only_b = next(iter(mixed_dataset(src, TOK, 16, 8, 0, domains=["b"])))
    assert (only_b["domain"] == 1).all()


def test_corpus_source_with_token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("READMEJAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    for domain, lo in (("x", 10), ("y", 500)):
        (src / domain).mkdir(parents=True)
        for i, d in enumerate(_docs(40, lo=lo, seed=lo)):
            (src / domain / f"{i}.txt").write_text(d)
    build_corpus(tmp_path / "c", TOK, from_dir=src, min_heldout_chars=100)
    first = _take(iter(lm_dataset(tmp_path / "c", "y", "train", TOK, 8, 2, seed=1)), 3)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    again = _take(iter(lm_dataset(tmp_path / "c", "y", "train", TOK, 8, 2, seed=1)), 3)
    assert _same(first, again)
    assert all((b["input_ids"][b["input_ids"] > 2] >= 500).all() for b in first)
    mixed = next(iter(mixed_dataset(tmp_path / "c", TOK, 8, 16, seed=1)))
    assert set(mixed["domain"].tolist()) == {0, 1}


# -------------------------------------------------------------------------------------- perplexity
def _tiny_corpus(tmp_path, n_docs=30):
    src = tmp_path / "src"
    for domain, lo in (("p", 10), ("q", 500)):
        (src / domain).mkdir(parents=True)
        for i, d in enumerate(_docs(n_docs, lo=lo, seed=lo)):
            (src / domain / f"{i}.txt").write_text(d)
    build_corpus(tmp_path / "c", TOK, from_dir=src, min_heldout_chars=600)
    return tmp_path / "c"


def test_heldout_windows_follow_the_protocol(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    inputs, targets = heldout_windows(corpus, "q", TOK, seq_len=8, max_tokens=30)
    assert inputs.shape == targets.shape == (3, 8)  # 30 // 8 windows
    from readme_jax.data.corpus import load_corpus
    texts = list(load_corpus(corpus).texts("q", "heldout"))
    stream = [t for d in texts for t in TOK.encode(d) + [TOK.eos_id]]
    np.testing.assert_array_equal(targets.reshape(-1), stream[:24])
    assert (inputs[:, 0] == TOK.bos_id).all()
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    with pytest.raises(ValueError, match="fewer than"):
        heldout_windows(corpus, "q", TOK, seq_len=8, max_tokens=10**6)


def test_perplexity_of_known_distributions(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    V = TOK.vocab_size

    def uniform(ids):  # forward_fn variant: every token has probability 1 / V
        return jnp.zeros(ids.shape + (V,), jnp.float32)

    res = evaluate_perplexity(uniform, TOK, corpus, seq_len=8, max_tokens=40, batch_size=3, progress=False)
    assert list(res) == ["p", "q"]
    for r in res.values():
        assert r["tokens"] == 40 and math.isclose(r["nll"], math.log(V), rel_tol=1e-6)
        assert math.isclose(r["ppl"], V, rel_tol=1e-5)

    def support(ids):  # uniform over q's 100 content ids + eos: every q target has probability 1 / 101
        v = jnp.arange(V)
        return jnp.where((v >= 500) & (v < 600) | (v == TOK.eos_id), 0.0, -1e9)[None, None, :] + jnp.zeros(
            ids.shape + (V,))

    q = evaluate_perplexity(support, TOK, corpus, seq_len=8, max_tokens=40, batch_size=2, domains=["q"],
                            progress=False)["q"]
    assert math.isclose(q["ppl"], 101, rel_tol=1e-4)
    p = evaluate_perplexity(support, TOK, corpus, seq_len=8, max_tokens=40, batch_size=2, domains=["p"],
                            progress=False)["p"]
    assert p["ppl"] == math.inf


def test_nnx_model_and_text_perplexity():
    from flax import nnx

    class Bigram(nnx.Module):  # logits = a table row per input token
        def __init__(self, V):
            self.table = nnx.Param(jnp.zeros((V, V)))

        def __call__(self, ids):
            return self.table[ids]

    m = Bigram(TOK.vocab_size)
    m.table[...] = m.table[...].at[:, 7].set(20.0)  # always predicts 7
    assert text_perplexity(m, TOK, "7 7 7 7 7", seq_len=2) < 1.01
    assert text_perplexity(m, TOK, "8 8 8", seq_len=2) > 1e6
    words = " ".join(map(str, range(100)))
    shuffled = shuffle_words(words, seed=1)
    assert shuffled != words and sorted(shuffled.split()) == sorted(words.split())
    assert shuffle_words(words, seed=1) == shuffled
