"""The real SmolLM2-135M-Instruct Q4_1 GGUF vs transformers loading the same GGUF itself.

transformers does its own dequantisation, Q/K un-permutation and tokenizer, so agreement checks ours
end to end. Both models load once per module (the GGUF load + one SmolLM2-scale compile per call shape).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (requirements-dev installs it; a skip would hide a broken install)
import transformers  # noqa: E402

from readme_jax.convert.load import load_pretrained  # noqa: E402

PRIDE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
         "in want of a wife. However little known the feelings or views of such a man may be on his first "
         "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
         "he is considered the rightful property of some one or other of their daughters.")


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    kw = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32,
                                                              **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    return model, tok


@pytest.mark.slow(reason="loads and runs the real SmolLM2-135M")
def test_config_from_gguf_metadata(ours):
    cfg = ours[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings and ours[0].tok.lm_head is None


@pytest.mark.slow(reason="loads and runs the real SmolLM2-135M")
def test_logits_match_transformers_on_real_text(ours, reference):
    model, tok = ours
    hf_model, hf_tok = reference
    ids = hf_tok(PRIDE)["input_ids"]
    if tok is not None:
        assert tok.encode(PRIDE) == ids
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.float().numpy()
    got = np.asarray(model(jnp.asarray([ids], jnp.int32)))
    chex.assert_shape(got, (1, len(ids), 49152))
    diff = np.abs(got - ref).max()
    assert diff <= 1e-3, f"max |logit diff| {diff:.3g}"
    # a real pre-trained model: next-token NLL on the paragraph is low (perplexity ~30, DATA.md)
    logp = got[0, :-1] - np.log(np.exp(got[0, :-1] - got[0, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - got[0, :-1].max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.asarray(ids[1:])[:, None], -1).mean()
    assert np.exp(nll) < 60, np.exp(nll)


def _greedy_with_cache(model, ids, n):
    cache = model.init_cache(1, len(ids) + n)
    logits, cache = model(jnp.asarray([ids], jnp.int32), cache=cache)
    out = []
    for _ in range(n):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        logits, cache = model(jnp.asarray([[nxt]], jnp.int32), cache=cache)
    return out


@pytest.mark.slow(reason="loads and runs the real SmolLM2-135M")
def test_greedy_capital_of_france(ours, reference):
    model, tok = ours
    hf_model, hf_tok = reference
    prompt = "The capital of France is"
    ids = hf_tok(prompt)["input_ids"]
    with torch.no_grad():
        hf_new = hf_model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids):].tolist()
    new = _greedy_with_cache(model, ids, 3)
    assert new == hf_new
    assert hf_tok.decode(new).startswith(" Paris"), hf_tok.decode(new)
    if tok is not None:
        import readme_jax

        text = readme_jax.generate(model, tok, prompt, max_new_tokens=3)
        assert text.startswith(" Paris"), text


@pytest.mark.slow(reason="loads and runs the real SmolLM2-135M")
def test_export_to_hf_loads_in_transformers(ours, reference, tmp_path):
    """GGUF -> our params -> HF safetensors + tokenizer files -> transformers == transformers on the GGUF."""
    from readme_jax.convert.hf_export import export_hf

    model, tok = ours
    hf_model, hf_tok = reference
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = hf_tok(PRIDE[:120])["input_ids"]
    with torch.no_grad():
        diff = (back(torch.tensor([ids])).logits - hf_model(torch.tensor([ids])).logits).abs().max().item()
    assert diff <= 1e-5, diff
    if tok is not None:
        back_tok = transformers.AutoTokenizer.from_pretrained(out)
        assert back_tok(PRIDE)["input_ids"] == hf_tok(PRIDE)["input_ids"]


@pytest.mark.slow(reason="loads and runs the real SmolLM2-135M")
def test_heldout_perplexity_per_domain_is_far_below_shuffled_text(ours, tmp_path):
    """Real held-out text of three default domains: finite perplexity, far below the same words shuffled."""
    from readme_jax.data.corpus import build_corpus, load_corpus
    from readme_jax.eval.perplexity import evaluate_perplexity, shuffle_words, text_perplexity

    model, tok = ours
    build_corpus(tmp_path / "corpus", tok, domains=["reference", "drama", "poetry"])
    corpus = load_corpus(tmp_path / "corpus")
    ppl = evaluate_perplexity(model, tok, corpus, seq_len=256, max_tokens=512, batch_size=2, progress=False)
    for domain, r in ppl.items():
        text = " ".join(next(iter(corpus.texts(domain, "heldout"))).split()[:150])
        shuffled = text_perplexity(model, tok, shuffle_words(text, seed=0), seq_len=256)
        assert r["tokens"] == 512 and np.isfinite(r["ppl"]), domain
        assert r["ppl"] * 4 < shuffled, (domain, r["ppl"], shuffled)
