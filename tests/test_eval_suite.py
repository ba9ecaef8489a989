"""The evaluation suite: the held-out document sampler, the weighted bootstrap against a NumPy reference, the
cloze scoring rule and the committed set, and the suite CLI end to end on tiny models."""

import json
import string

import numpy as np
import pytest

from readme_jax.eval import cloze, sampler, suite, window_scores
from readme_jax.eval.paired import bootstrap_mean, paired_bootstrap
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from tests.tiny_models import random_model

ALPHABET = string.ascii_lowercase + " .,=+-*0123456789"


class CharTokenizer:
    """One token per character (ids 3..), bos=1, eos=2 (the text "\\n"), pad=0."""

    bos_id, eos_id, pad_id, add_bos_default, fingerprint = 1, 2, 0, True, "chars"
    vocab_size = 3 + len(ALPHABET)

    def encode(self, text, *, bos=False, eos=False):
        return [1] * bos + [2 if c == "\n" else 3 + ALPHABET.index(c) for c in text] + [2] * eos

    def encode_batch(self, texts, *, bos=False):
        return [self.encode(t, bos=bos) for t in texts]

    def decode(self, ids):
        return "".join("\n" if i == 2 else ALPHABET[i - 3] for i in ids if i >= 2)


def _corpus(root, heldout, train=None):
    """A corpus folder; ``train`` None writes a train split that is not JSON (any read of it fails)."""
    manifest = {"format": 1, "domains": {}}
    for domain, docs in heldout.items():
        (root / domain).mkdir(parents=True)
        (root / domain / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (root / domain / "train.jsonl").write_text("not json\n" if train is None else train)
        manifest["domains"][domain] = {"splits": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _docs(seed, n, lo=20, hi=90):
    rng = np.random.default_rng(seed)
    return [f"doc{seed}x{i} " + "".join(rng.choice(list(string.ascii_lowercase + " "), size=int(rng.integers(lo, hi))))
            for i in range(n)]


# -------------------------------------------------------------------------------------------- sampler
def test_sampler_is_seeded_whole_documents_of_the_heldout_split_only(tmp_path):
    tok = CharTokenizer()
    docs = {"news": _docs(1, 30), "code": _docs(2, 20)}
    root = _corpus(tmp_path / "c", docs)                    # train.jsonl is not JSON: reading it would raise
    a = sampler.sample_domain(root, "news", tok, min_tokens=400, seq_len=16, seed=0)
    b = sampler.sample_domain(root, "news", tok, min_tokens=400, seq_len=16, seed=0)
    assert np.array_equal(a.doc_index, b.doc_index) and np.array_equal(a.inputs, b.inputs)
    assert np.array_equal(a.targets, b.targets) and np.array_equal(a.weights, b.weights)
    other = sampler.sample_domain(root, "news", tok, min_tokens=400, seq_len=16, seed=1)
    assert not np.array_equal(other.doc_index, a.doc_index)
    assert list(a.doc_index) != sorted(a.doc_index) or a.doc_index[0] != 0          # not the file's head
    # whole documents, in draw order, until the budget: the last one crosses it, the ones before do not
    lengths = [len(docs["news"][i]) + 1 for i in a.doc_index]
    assert sum(lengths) >= 400 > sum(lengths[:-1]) and a.tokens == sum(lengths)
    assert list(a.doc_index) == list(sampler.draw_order(30, "news", 0)[:len(a.doc_index)])
    # windows: BOS, then the document's tokens shifted by one; padding has weight 0; no window spans two documents
    for w in range(len(a.inputs)):
        doc = tok.encode(docs["news"][a.doc_index[a.window_doc[w]]]) + [tok.eos_id]
        k = int(np.sum(a.window_doc[:w] == a.window_doc[w])) * 16
        n = int(a.weights[w].sum())
        assert a.inputs[w, 0] == tok.bos_id and list(a.targets[w, :n]) == doc[k:k + n]
        assert list(a.inputs[w, 1:n]) == doc[k:k + n - 1] and not a.weights[w, n:].any()
    # a domain's draw does not depend on the other domains; too few tokens is an error naming the file
    code = sampler.sample_domain(root, "code", tok, min_tokens=100, seq_len=16, seed=0)
    assert set(code.doc_index) <= set(range(20))
    with pytest.raises(ValueError, match=r"news/heldout\.jsonl: .* fewer than min_tokens=100000"):
        sampler.sample_domain(root, "news", tok, min_tokens=100_000, seq_len=16)
    with pytest.raises(ValueError, match="no domain 'poetry'"):
        sampler.sample_domain(root, "poetry", tok, min_tokens=10, seq_len=16)


# ------------------------------------------------------------------------------------------ bootstrap
def _reference_ci(v, w, samples, seed, chunk):
    """The weighted-mean percentile bootstrap written out one resample at a time (the same index draws)."""
    rng = np.random.default_rng(seed)
    means = []
    for i in range(0, samples, chunk):
        for idx in rng.integers(0, len(v), size=(min(chunk, samples - i), len(v))):
            means.append(sum(w[j] * v[j] for j in idx) / sum(w[j] for j in idx))
    return np.percentile(means, [2.5, 97.5])


def test_weighted_bootstrap_matches_numpy_reference_and_normal_width():
    rng = np.random.default_rng(3)
    v, w = rng.normal(2.0, 1.0, 60), rng.integers(1, 50, 60).astype(float)
    got = bootstrap_mean(v, weights=w, samples=700, seed=5, chunk=300)
    lo, hi = _reference_ci(v, w, 700, 5, 300)
    assert got["mean"] == pytest.approx(np.sum(w * v) / np.sum(w))
    assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(hi, abs=1e-12)
    # paired: the diff of weighted means, the same draws for both
    u = v + rng.normal(0.1, 0.2, 60)
    d = paired_bootstrap(u, v, weights=w, samples=700, seed=5, chunk=300)
    lo, hi = _reference_ci(u - v, w, 700, 5, 300)
    assert d["diff"] == pytest.approx(np.sum(w * (u - v)) / np.sum(w)) and d["ci_low"] == pytest.approx(lo)
    assert d["ci_high"] == pytest.approx(hi) and d["p_value"] < 0.01
    # unweighted, large N: the 95% interval is ~ +-1.96 sd / sqrt(N)
    x = rng.normal(0.0, 1.0, 4000)
    b = bootstrap_mean(x, samples=2000, seed=0)
    assert b["ci_high"] - b["ci_low"] == pytest.approx(2 * 1.96 * x.std() / np.sqrt(x.size), rel=0.1)
    with pytest.raises(ValueError, match="weights"):
        bootstrap_mean(v, weights=w[:3])


def test_window_statistics():
    scores = {"nll": [2.0, 9.0, 1.0], "tokens": [2, 3, 1], "top1": [[1, 2], [3, 4], [5, 6]]}
    other = {"nll": [1.0, 6.0, 1.0], "tokens": [2, 3, 1], "top1": [[1, 0], [3, 4], [0, 6]]}
    p = window_scores.perplexity_ci(scores, samples=500)
    assert p["nll"] == pytest.approx(12 / 6) and p["ppl"] == pytest.approx(np.exp(2.0)) and p["tokens"] == 6
    assert p["ppl_low"] <= p["ppl"] <= p["ppl_high"]
    d = window_scores.nll_difference(scores, other, samples=500)
    assert d["diff"] == pytest.approx((12 - 8) / 6) and d["ratio"] == pytest.approx(np.exp(4 / 6))
    weights = np.array([[1, 1], [1, 1], [1, 0]], np.float32)
    a = window_scores.top1_agreement(scores, other, weights, samples=500)
    assert a["agreement"] == pytest.approx(3 / 5) and a["tokens"] == 5      # the padded mismatch is not counted
    with pytest.raises(ValueError, match="same windows"):
        window_scores.nll_difference(scores, {**other, "tokens": [2, 3, 2]})


# ---------------------------------------------------------------------------------------------- cloze
def test_cloze_rule_candidates_and_committed_set():
    it = cloze.ClozeItem("capital", "The capital of India is", ("New Delhi",))
    assert cloze.answered(it, " New Delhi, of course") and cloze.answered(it, " new delhi")
    assert not cloze.answered(it, " Delhi") and not cloze.answered(it, " New Delhite")
    five = cloze.ClozeItem("arithmetic", "2 + 3 =", ("5",))
    assert cloze.answered(five, " 5\n") and not cloze.answered(five, " 15") and not cloze.answered(five, " 55")
    assert cloze.answered(five, " 5.") and cloze.answered(five, "2 + 3 = 5")
    assert cloze.answered(cloze.ClozeItem("opposite", "The opposite of big is", ("small", "little")), " little.")
    assert cloze.candidates(0) == cloze.candidates(0) and cloze.candidates(0) != cloze.candidates(1)
    record = json.loads(cloze.ITEMS_PATH.read_text())
    items = cloze.load_items()
    assert record["kept"] == len(items) and record["candidates"] == len(cloze.candidates(record["seed"]))
    assert record["kept"] + len(record["dropped"]) == record["candidates"] >= 60
    for row in record["items"]:
        assert cloze.answered(cloze.ClozeItem.from_json(row), row["parent_output"])
    for row in record["dropped"]:
        assert not cloze.answered(cloze.ClozeItem.from_json(row), row["parent_output"])
    assert {i.to_json()["prompt"] for i in items} <= {c.prompt for c in cloze.candidates(record["seed"])}


# ------------------------------------------------------------------------------------------ suite CLI
CFG = LlamaConfig(vocab_size=CharTokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def test_suite_cli_end_to_end(tmp_path, monkeypatch, capsys):
    tok = CharTokenizer()
    root = _corpus(tmp_path / "corpus", {"news": _docs(1, 24), "code": _docs(2, 12)})
    items = tmp_path / "cloze.json"
    rows = [{"kind": "line", "prompt": p, "answers": [a]} for p, a in (("abc", "d"), ("one two", "three"))]
    items.write_text(json.dumps({"format": 1, "items": rows}))
    models = {"a": random_model(lambda r: Llama(CFG, rngs=r), seed=0, std=0.3),
              "b": random_model(lambda r: Llama(CFG, rngs=r), seed=1, std=0.3)}
    models["a_again"] = models["a"]
    for name in models:
        (tmp_path / name).mkdir()
    monkeypatch.setattr(suite, "load_model", lambda spec, dtype=None: (spec, models[suite.Path(spec).name], tok))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["--corpus", str(root), "--out", str(out), "--ppl-tokens", "300", "--seq-len", "32", "--batch", "4",
            "--mc-items-per-domain", "6", "--mc-context-tokens", "8", "--mc-continuation-tokens", "4",
            "--bootstrap", "200", "--cloze-items", str(items), "--cloze-batch", "2", "--mc-batch", "16",
            "--no-progress"]
    assert suite.main(["--model", "ref=a", "--model", "b", "--model", "same=a_again", *args]) == 0
    ev = out / "eval"
    assert {p.name for p in ev.iterdir()} == {"ppl.json", "agreement.json", "mc.json", "cloze.json", "summary.md",
                                              "ppl_ratio.png", "raw"}
    assert {p.name for p in (ev / "raw").iterdir()} == {"model_ref.json", "model_b.json", "model_same.json"}
    ppl = json.loads((ev / "ppl.json").read_text())["ppl"]
    assert set(ppl["draw"]) == {"news", "code"} and all(d["tokens"] >= 300 for d in ppl["draw"].values())
    # the suite's perplexity is the model's own token NLL over the drawn windows
    smp = sampler.sample_domain(root, "news", tok, min_tokens=300, seq_len=32)
    nll = np.asarray(models["b"].token_nll(smp.inputs, smp.targets))
    assert ppl["models"]["b"]["news"]["nll"] == pytest.approx(float((nll * smp.weights).sum() / smp.weights.sum()),
                                                              rel=1e-4)
    pairs = {(p["a"], p["b"]): p["domains"] for p in ppl["pairs"]}
    assert set(pairs) == {("b", "ref"), ("same", "ref"), ("same", "b")}
    same = pairs[("same", "ref")]["news"]
    assert same["ratio"] == same["ratio_low"] == same["ratio_high"] == 1.0
    b = pairs[("b", "ref")]["news"]
    assert b["ratio_low"] < b["ratio"] < b["ratio_high"]
    agr = json.loads((ev / "agreement.json").read_text())["agreement"]
    assert set(agr) == {"b", "same"} and agr["same"]["news"]["agreement"] == 1.0 and agr["b"]["news"]["agreement"] < 1
    mc = json.loads((ev / "mc.json").read_text())["mc"]
    assert mc["items"] == 12 and mc["models"]["same"]["overall"] == mc["models"]["ref"]["overall"]
    assert [r["verdict"] for r in mc["vs_reference"]][0] == "reference"
    cz = json.loads((ev / "cloze.json").read_text())["cloze"]
    assert cz["models"]["ref"]["outputs"] == cz["models"]["same"]["outputs"] and cz["models"]["ref"]["items"] == 2
    summary = (ev / "summary.md").read_text()
    assert "kept" in summary and "b / ref ratio" in summary and "Multiple choice" in summary
    assert "Held-out perplexity" in capsys.readouterr().out
    # a rerun reuses every model's raw scores (same settings); other settings recompute
    first = (ev / "ppl.json").read_text()
    monkeypatch.setattr(suite, "score_model", lambda *a, **k: pytest.fail("recomputed"))
    assert suite.main(["--model", "ref=a", "--model", "b", "--model", "same=a_again", *args]) == 0
    assert json.loads((ev / "ppl.json").read_text())["ppl"] == json.loads(first)["ppl"]
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        suite.main(["--model", "ref=a", *args, "--seed", "1"])
    capsys.readouterr()
    # bad input: one error line, exit 2
    assert suite.main(["--model", "a", "--model", "a", *args]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --model labels repeat")
    assert suite.main(["--model", "nope", *args]) == 2
    assert "nope: no such model" in capsys.readouterr().err
    assert suite.main(["--model", "a@int8", *args]) == 2
    assert "dtype 'int8'" in capsys.readouterr().err
    assert suite.main(["--model", "a", *args, "--ppl-tokens", "99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than min_tokens=99999" in err[0]


def test_science_evaluate_writes_the_experiment_folder_and_resumes(tmp_path, monkeypatch):
    """``python -m readme_jax.science evaluate``'s entry on a stand-in finished run (tiny models, same compiles
    as the CLI test): eval/*.json + table.md under science/evaluate, model parts reused on a rerun."""
    import types

    from readme_jax.science.evaluate import evaluate
    tok = CharTokenizer()
    dense = random_model(lambda r: Llama(CFG, rngs=r), seed=0, std=0.3)
    moe = random_model(lambda r: Llama(CFG, rngs=r), seed=1, std=0.3)
    items = tmp_path / "cloze.json"
    items.write_text(json.dumps({"format": 1, "items": [{"kind": "line", "prompt": "abc", "answers": ["d"]}]}))
    monkeypatch.setattr(cloze, "ITEMS_PATH", items)
    run = types.SimpleNamespace(dir=tmp_path / "run", cfg=types.SimpleNamespace(name="tiny"), dense=dense,
                                tokenizer=tok, trained_model=lambda: moe,
                                corpus=_corpus(tmp_path / "corpus", {"news": _docs(1, 24), "code": _docs(2, 12)}))
    settings = suite.SuiteSettings(ppl_tokens=300, seq_len=32, batch=4, mc_items_per_domain=6, mc_context_tokens=8,
                                   mc_continuation_tokens=4, mc_batch=16, cloze_batch=2, bootstrap=200)
    result = evaluate(run, settings, progress=False)
    folder = run.dir / "science" / "evaluate"
    assert result["models"] == ["dense parent", "Read-ME"]
    assert {"ppl.json", "agreement.json", "mc.json", "cloze.json", "summary.md"} <= {p.name for p in (folder / "eval").iterdir()}
    assert (folder / "table.md").read_text().startswith("**Held-out perplexity**")
    assert json.loads((folder / "result.json").read_text())["cloze"]["Read-ME"][1] == 1
    monkeypatch.setattr(suite, "score_model", lambda *a, **k: pytest.fail("recomputed"))
    again = evaluate(run, settings, progress=False)
    assert again["ppl"]["models"] == result["ppl"]["models"]
