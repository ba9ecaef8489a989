"""Multiple-choice scoring: hand-checked log-likelihoods, padding invariance, MMLU prompts, the built-in
task, paired tests and the CLI's bad-input exits."""

import csv
import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import readme_jax
from readme_jax.eval import multiple_choice as mc
from readme_jax.eval.mc_tasks import MCItem, builtin_items, mmlu_items
from readme_jax.eval.multiple_choice import encode_item, evaluate_items, make_loglik_fn, summarize
from readme_jax.eval.paired import compare_models, format_comparison, mcnemar, paired_bootstrap
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import Llama
from tests.tiny_models import random_model

ALPHABET = string.ascii_lowercase + " "


class CharTokenizer:
    """One token per character of ``alphabet`` (ids 3..), bos=1, eos=2 (the text "\\n"), pad=0."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, alphabet=ALPHABET):
        self.alphabet = alphabet
        self.vocab_size = 3 + len(alphabet)

    def encode(self, text, *, bos=False, eos=False):
        return [1] * bos + [2 if c == "\n" else 3 + self.alphabet.index(c) for c in text] + [2] * eos

    def decode(self, ids):
        return "".join("\n" if i == 2 else self.alphabet[i - 3] for i in ids if i >= 2)


class Bigram(nnx.Module):
    """token_nll from a fixed bigram table: -log softmax(table)[input, target]."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, input_ids):
        """logits [B, T, V] (not a CausalLM of model/protocol.py, so the scorers call it)."""
        return self.table[...][input_ids]

    def token_nll(self, input_ids, targets):
        logp = jax.nn.log_softmax(self.table[...], axis=-1)[input_ids]                  # [B, T, V]
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def chain_table(vocab, boost=6.0, seed=0):
    """Small noise, plus ``boost`` on letter -> next letter of the alphabet (so "abc" wants "def")."""
    m = 0.1 * np.random.default_rng(seed).standard_normal((vocab, vocab))
    for i in range(26):
        m[3 + i, 3 + (i + 1) % 26] += boost
    return m


def hand_loglik(table, tok, context, continuation):
    m = np.asarray(table, np.float64)
    logp = m - np.log(np.exp(m).sum(-1, keepdims=True))
    ctx, cont = tok.encode(context), tok.encode(continuation)
    seq = [tok.bos_id] + ctx + cont
    return sum(logp[seq[j - 1], seq[j]] for j in range(1 + len(ctx), len(seq)))


# ------------------------------------------------------------------------------------------ scoring
def test_forced_answer_wins_and_logliks_match_hand():
    tok = CharTokenizer()
    table = chain_table(tok.vocab_size)
    items = [MCItem("abc", ("dez", "def", "dxy", "qrs"), 1, "chain"),
             MCItem("the lmn", ("opq", "oqp", "zzz"), 0, "chain"),
             MCItem("uv", ("wxyz", "w", "wxy abc"), 1, "mixed"),
             MCItem("gh", ("ij", "ij"), 1, "tie")]
    results = evaluate_items(Bigram(table), tok, items, batch_size=4)
    for item, r in zip(items, results):
        want = [hand_loglik(table, tok, item.context, c) for c in item.choices]
        np.testing.assert_allclose(r.logliks, want, atol=1e-5, rtol=0)
        nbytes = [len(c.encode("utf-8")) for c in item.choices]
        assert r.byte_lengths == tuple(nbytes)
        assert r.pred == int(np.argmax(want)) and r.pred_norm == int(np.argmax(np.array(want) / nbytes))
    assert results[0].correct and results[0].correct_norm
    assert results[1].correct and results[1].correct_norm
    assert results[3].pred == results[3].pred_norm == 0 and not results[3].correct  # ties: lowest index
    s = summarize(results)
    assert list(s["groups"]) == ["chain", "mixed", "tie"]
    assert s["groups"]["chain"] == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    assert s["overall"]["n"] == 4 and s["groups"]["tie"]["acc"] == 0.0
    assert json.loads(json.dumps(results[0].to_json()))["correct"] is True
    logits = jnp.asarray(table, jnp.float32)   # a plain forward_fn(ids) -> logits [B, T, V] scores the same
    plain = evaluate_items(lambda ids: logits[ids], tok, items, batch_size=4)
    for p, r in zip(plain, results):
        np.testing.assert_allclose(p.logliks, r.logliks, atol=1e-6)


def test_context_cut_from_the_left_keeps_bos():
    tok = CharTokenizer()
    rows = encode_item(MCItem("abcdefgh", ("xyz", "q"), 0, "g"), tok, max_len=5)
    assert rows[0] == ([1] + tok.encode("gh") + tok.encode("xyz"), 3)
    assert rows[1] == ([1] + tok.encode("efgh") + tok.encode("q"), 1)
    with pytest.raises(ValueError, match="more than max_len=2"):
        encode_item(MCItem("ab", ("xyz", "q"), 0, "g"), tok, max_len=2)
    with pytest.raises(ValueError, match="no tokens"):
        encode_item(MCItem("ab", ("", "q"), 0, "g"), tok)


def test_padded_batches_match_unpadded_rows_on_a_tiny_llama():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=128)
    model = random_model(lambda rngs: Llama(cfg, rngs=rngs), seed=3, std=0.3)
    tok = CharTokenizer()
    items = [MCItem("hello world", ("s are", "ly"), 0, "a"),           # rows of 16 and 13 tokens
             MCItem("zzzzzzzzzz", ("top", "ab"), 1, "b")]                # 13 and 12
    results = evaluate_items(model, tok, items, batch_size=3, bucket=32)   # the 2nd batch has 2 filler rows
    fn = make_loglik_fn(model)
    lengths = set()
    for item, r in zip(items, results):
        for (tokens, n_cont), got in zip(encode_item(item, tok), r.logliks):
            ids, targets = np.array([tokens[:-1]], np.int32), np.array([tokens[1:]], np.int32)
            w = np.zeros(ids.shape, np.float32)
            w[0, -n_cont:] = 1
            lengths.add(ids.shape[1])
            np.testing.assert_allclose(got, fn(ids, targets, w)[0], atol=2e-5, rtol=1e-5)
    assert len(lengths) > 1  # really compared different padding amounts


# --------------------------------------------------------------------------------------------- MMLU
def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


ALG_DEV = [["Find 1+1.", "1", "2", "3", "4", "B"], ["Is 0 even?", "yes", "no", "maybe", "never", "A"]]
ALG_TEST = [['What is "x", if x, y = 2, 3?', "2", "3", "5", "6", "A"], ["Pick D.", "a", "b", "c", "d", "D"]]


@pytest.fixture
def mmlu_dir(tmp_path):
    root = tmp_path / "mmlu"
    _write_csv(root / "dev" / "abstract_algebra_dev.csv", ALG_DEV)
    _write_csv(root / "test" / "abstract_algebra_test.csv", ALG_TEST)
    _write_csv(root / "dev" / "high_school_physics_dev.csv", [["F = ?", "ma", "mv", "m/a", "0", "A"]])
    _write_csv(root / "test" / "high_school_physics_test.csv", [["c is", "fast", "slow", "zero", "one", "A"]])
    return root


def test_mmlu_prompt_k1_and_layouts(mmlu_dir, tmp_path):
    items = mmlu_items(mmlu_dir, k_shot=1)
    assert [i.group for i in items] == ["abstract_algebra", "abstract_algebra", "high_school_physics"]
    assert items[0].context == ("The following are multiple choice questions (with answers) about abstract algebra."
                                "\n\nFind 1+1.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                                'What is "x", if x, y = 2, 3?\nA. 2\nB. 3\nC. 5\nD. 6\nAnswer:')
    assert items[0].choices == (" A", " B", " C", " D")
    assert [i.answer for i in items] == [0, 3, 0]
    assert items[2].context.startswith("The following are multiple choice questions (with answers) about "
                                       "high school physics.\n\nF = ?\nA. ma\n")
    zero = mmlu_items(mmlu_dir, k_shot=0, subjects=["abstract_algebra"])
    assert zero[1].context.endswith("about abstract algebra.\n\nPick D.\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    flat = tmp_path / "flat"   # files directly in one folder
    for p in mmlu_dir.rglob("*.csv"):
        _write_csv(flat / p.name, list(csv.reader(open(p, newline=""))))
    assert mmlu_items(flat, k_shot=1) == items


def test_mmlu_bad_input(mmlu_dir, tmp_path):
    bad = mmlu_dir / "test" / "abstract_algebra_test.csv"
    _write_csv(bad, [ALG_TEST[0], ["short", "a", "b", "c", "D"]])
    with pytest.raises(ValueError, match=r"abstract_algebra_test\.csv: row 2 .*5 columns, expected 6"):
        mmlu_items(mmlu_dir, k_shot=0)
    _write_csv(bad, [ALG_TEST[0], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=r"abstract_algebra_test\.csv: row 2 .*answer 'E', expected one of A/B/C/D"):
        mmlu_items(mmlu_dir, k_shot=0)
    _write_csv(bad, ALG_TEST)
    with pytest.raises(ValueError, match=r"high_school_physics_dev\.csv: 1 rows, fewer than k_shot=2"):
        mmlu_items(mmlu_dir, k_shot=2)
    with pytest.raises(ValueError, match="no such folder"):
        mmlu_items(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <subject>_test.csv"):
        mmlu_items(tmp_path / "empty")


# ----------------------------------------------------------------------------------------- built-in
def _corpus(root, docs_by_domain):
    manifest = {"format": 1, "domains": {}}
    for domain, docs in docs_by_domain.items():
        (root / domain).mkdir(parents=True)
        for split, split_docs in (("train", docs[:1]), ("heldout", docs)):
            (root / domain / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in split_docs))
        manifest["domains"][domain] = {"splits": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _docs(seed, n, length):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(ALPHABET), size=length + i)) for i in range(n)]


def test_builtin_items(tmp_path):
    tok = CharTokenizer()
    docs = {"news": _docs(1, 8, 90), "code": _docs(2, 6, 70)}
    root = _corpus(tmp_path / "corpus", docs)
    kw = dict(items_per_domain=30, context_tokens=8, continuation_tokens=4)
    items = builtin_items(root, tok, seed=0, **kw)
    assert items == builtin_items(root, tok, seed=0, **kw)
    assert items != builtin_items(root, tok, seed=1, **kw)
    assert [i for i in items if i.group == "code"] == builtin_items(root, tok, seed=0, domains=["code"], **kw)
    assert [i.group for i in items] == ["news"] * 30 + ["code"] * 30
    for domain in docs:
        text = "".join(d + "\n" for d in docs[domain])   # the stream, eos decoded as "\n"
        passages = [text[i:i + 12] for i in range(0, len(text) - 11, 12)]
        cont_of = {p[:8]: p[8:] for p in passages}
        conts = [p[8:] for p in passages]
        dom = [i for i in items if i.group == domain]
        assert len({i.context for i in dom}) == 30   # distinct passages
        for item in dom:
            assert len(item.choices) == 4 and item.choices[item.answer] == cont_of[item.context]
            others = [c for j, c in enumerate(item.choices) if j != item.answer]
            assert all(c in conts for c in others)   # other passages of the same domain
            own = passages.index(item.context + item.choices[item.answer])
            assert all(conts.index(c) != own for c in others) and len(set(others)) == 3
        assert min(np.bincount([i.answer for i in dom], minlength=4)) >= 3   # answers spread over 4 slots
    with pytest.raises(ValueError, match=r"code/heldout\.jsonl: .* fewer than the 100 needed"):
        builtin_items(root, tok, items_per_domain=100, context_tokens=8, continuation_tokens=4, domains=["code"])


# -------------------------------------------------------------------------------------------- paired
def test_mcnemar_and_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.7
    assert mcnemar(a, a) == {"b01": 0, "b10": 0, "p_value": 1.0}
    assert mcnemar([True] * 6, [False] * 6)["p_value"] == pytest.approx(2 * 0.5 ** 6)
    b = rng.random(400) < 0.5
    t = mcnemar(a, b)
    assert t["b10"] == int(np.sum(a & ~b)) and t["b01"] == int(np.sum(~a & b)) and t["p_value"] < 0.05
    boot = paired_bootstrap(a, b, samples=2000, seed=0)
    assert boot["diff"] == pytest.approx(a.mean() - b.mean())
    assert boot["ci_low"] < 0.2 < boot["ci_high"] and boot["ci_low"] > 0 and boot["p_value"] < 0.05
    assert paired_bootstrap(a, a, samples=100) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    near = a.copy()
    near[:3] = ~near[:3]
    rows = compare_models({"ref": a, "same": a, "worse": b, "near": near}, "ref", bootstrap_samples=200)
    assert [r["verdict"] for r in rows] == ["reference", "within noise", "worse", "within noise"]
    assert rows[2]["diff"] == pytest.approx(b.mean() - a.mean()) and rows[2]["ci_high"] < 0
    assert "worse" in format_comparison(rows)
    with pytest.raises(ValueError, match="same items"):
        mcnemar(a, b[:10])


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_bad_input_exits_2(tmp_path, mmlu_dir, capsys):
    model = tmp_path / "model"
    model.mkdir()
    assert mc.main(["--model", str(model), "--mmlu", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing: no such folder" in err[0]
    assert mc.main(["--model", str(tmp_path / "nomodel"), "--mmlu", str(mmlu_dir)]) == 2
    assert "nomodel: no such model" in capsys.readouterr().err
    assert mc.main(["--model", str(model), "--mmlu", str(mmlu_dir), "--k-shot", "9"]) == 2
    assert "fewer than k_shot=9" in capsys.readouterr().err
    assert mc.main(["--model", str(model), "--corpus", str(tmp_path / "nocorpus")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_compares_models(tmp_path, mmlu_dir, capsys, monkeypatch):
    tok = CharTokenizer(string.printable)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    tables = {str(good): np.zeros((tok.vocab_size,) * 2), str(bad): np.zeros((tok.vocab_size,) * 2)}
    tables[str(good)][tok.encode(" ")[0], tok.encode("A")[0]] = 3.0   # good model always answers A
    monkeypatch.setattr(readme_jax, "load_pretrained", lambda p: (Bigram(tables[str(p)]), tok))
    out = tmp_path / "mc.json"
    assert mc.main(["--model", str(good), "--model", str(bad), "--mmlu", str(mmlu_dir), "--k-shot", "1",
                    "--bootstrap", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "abstract_algebra" in printed and "overall" in printed and "paired vs" in printed
    record = json.loads(out.read_text())
    assert record["models"][str(good)]["summary"]["overall"] == {"acc": 2 / 3, "acc_norm": 2 / 3, "n": 3}
    assert record["models"][str(bad)]["summary"]["overall"]["acc"] == 2 / 3   # all ties -> " A"
    assert [r["verdict"] for r in record["comparison"]["acc"]] == ["reference", "within noise"]
    assert len(record["models"][str(good)]["items"]) == 3


def test_cli_builtin_task(tmp_path, capsys, monkeypatch):
    tok = CharTokenizer()
    root = _corpus(tmp_path / "corpus", {"news": _docs(1, 4, 60)})
    model = tmp_path / "m"
    model.mkdir()
    monkeypatch.setattr(readme_jax, "load_pretrained", lambda p: (Bigram(chain_table(tok.vocab_size)), tok))
    out = tmp_path / "mc.json"
    assert mc.main(["--model", str(model), "--corpus", str(root), "--items-per-domain", "8", "--context-tokens",
                    "8", "--continuation-tokens", "4", "--bootstrap", "0", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["task"]["kind"] == "builtin" and record["models"][str(model)]["summary"]["groups"]["news"]["n"] == 8
    assert "news" in capsys.readouterr().out
    assert mc.main(["--model", str(model), "--corpus", str(root), "--items-per-domain", "99"]) == 2
    assert "fewer than the 99 needed" in capsys.readouterr().err
