"""Incremental detokenisation and stop strings against the real tokenizers (SmolLM2's byte-level BPE, the
Llama-2-layout SentencePiece model): no half characters released, and the releases add up to the decode."""

import numpy as np
import pytest

from readme_jax.data.tokenizers import load_tokenizer
from readme_jax.serve.detok import REPLACEMENT, IncrementalDetokenizer, StopStrings

TEXTS = [
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 ❤️ done",
    "東京は日本の首都です。北京，上海。한국어 텍스트",
    "Café naïve résumé façade — Ærøskøbing, Łódź, Ñandú",
    " Hello world, it's  a   test.\n\n\tdef f(x):\n    return x ** 2\n",
    "😀😀😀",
]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tok(request, smollm2_tokenizer, sentencepiece_model):
    if request.param == "bpe":
        return smollm2_tokenizer
    return load_tokenizer(sentencepiece_model)


def stream(tok, prompt, generated):
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in generated]
    return pieces, detok.flush()


def test_releases_add_up_to_the_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces, tail = stream(tok, (), ids)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special=True) == text
        assert tail == ""                                       # valid text: nothing left at the end
        assert not any(REPLACEMENT in p for p in pieces), pieces  # never half a character


def test_prompt_context_keeps_leading_spaces(tok):
    # Split every text after each token that ends on a character boundary: the generated part's stream is
    # the full decode minus the prompt's decode (SentencePiece keeps the leading space of the first word).
    for text in TEXTS:
        ids = tok.encode(text)
        for cut in range(1, len(ids)):
            prompt_text = tok.decode(ids[:cut])
            full = tok.decode(ids)
            if REPLACEMENT in prompt_text or not full.startswith(prompt_text):
                continue
            pieces, tail = stream(tok, ids[:cut], ids[cut:])
            assert "".join(pieces) + tail == full[len(prompt_text):], (text, cut)
            assert not any(REPLACEMENT in p for p in pieces)


def test_random_ids_still_add_up(tok):
    # Garbage (random ids, special tokens, lone bytes): whatever the decode says, the stream says too.
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 40)))]
        pieces, tail = stream(tok, (), ids)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special=True)


def test_special_tokens_give_no_text(tok):
    ids = tok.encode("Hi there") + [tok.eos_id]
    pieces, tail = stream(tok, (), ids)
    assert pieces[-1] == "" and "".join(pieces) + tail == "Hi there"


def feed_chunks(stops, chunks):
    s = StopStrings(stops)
    out, hit = [], False
    for c in chunks:
        text, hit = s.feed(c)
        out.append(text)
        if hit:
            break
    return "".join(out) + ("" if hit else s.flush()), hit


@pytest.mark.parametrize("chunks", [["Hello wor", "ld. STO", "P here"], ["Hello world. S", "T", "O", "P"],
                                    ["Hello world. STOP here"], list("Hello world. STOP here")])
def test_stop_string_across_chunks(chunks):
    assert feed_chunks(["STOP"], chunks) == ("Hello world. ", True)


def test_stop_never_released_and_earliest_completion_wins():
    s = StopStrings(["abcd", "bc"])
    assert s.feed("xa") == ("x", False)          # "a" could begin "abcd": held back
    assert s.feed("b") == ("", False)
    assert s.feed("cd") == ("a", True)           # "bc" completes before "abcd": "x" + "a" released
    assert s.feed("more") == ("", True)
    # Chunking does not change which stop wins.
    for chunks in (["xabcd"], list("xabcd"), ["xab", "cd"]):
        assert feed_chunks(["abcd", "bc"], chunks) == ("xa", True)


def test_partial_stop_released_when_it_does_not_complete():
    assert feed_chunks(["</s>", "\n\n"], ["a </", "b\n", "c"]) == ("a </b\nc", False)
    s = StopStrings(["END"])
    assert s.feed("the EN") == ("the ", False)
    assert s.flush() == "EN"
    assert StopStrings([]).feed("anything") == ("anything", False)


def test_stop_with_detokenizer_on_real_text(tok):
    text = "Le café 😀 est fermé. FIN du texte"
    ids = tok.encode(text)
    detok, stops = IncrementalDetokenizer(tok), StopStrings(["FIN", "😀 est x"])
    out, hit = [], False
    for t in ids:
        piece, hit = stops.feed(detok.add(t))
        out.append(piece)
        if hit:
            break
    assert hit and "".join(out) == "Le café 😀 est fermé. "


def test_bad_stops():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["ok", ""])
    with pytest.raises(TypeError):
        StopStrings("STOP")
