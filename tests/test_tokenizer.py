"""Tokenizer tests against independent references on real files.

* SmolLM2's byte-level BPE, rebuilt from the GGUF's metadata, against transformers loading the same GGUF
  itself (ids, special tokens, chat template);
* the Llama-2-layout SentencePiece model against ``sentencepiece`` itself, and the same vocabulary
  written into a GGUF (``llama`` tokenizer model) and read back;
* save -> load round trips, and clear errors for missing or corrupt files.
"""

import json

import pytest

from readme_jax.data.tokenizers import Tokenizer, load_tokenizer
from readme_jax.errors import TokenizerError

TEXTS = [
    "12345 and 3.14159",
    "The year 2024 had 366 days; v1.2.3 costs $4,999.99 (0x1F).",
    "Café naïve résumé façade — Ærøskøbing, Łódź, Ñandú",
    "東京は日本の首都です。北京，上海。한국어 텍스트",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 ❤️",
    "a    b\t\tc\n\n\n d  ",
    "   leading spaces and trailing   ",
    "line one\r\nline two\n\ttabbed\n",
    "def f(x: int) -> int:\n    \"\"\"Square.\"\"\"\n    return x ** 2  # comment\n\nprint(f(12))\n",
    "Hello, world! It's a test; don't panic.",
    "",
]


# ----------------------------------------------------------------------------------------------
# SmolLM2 GGUF (byte-level BPE) vs transformers' own GGUF tokenizer

@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.slow(reason="builds transformers' tokenizer from the GGUF")
def test_smollm2_ids_match_transformers(smollm2_tokenizer, hf_smollm2):
    texts = TEXTS + ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        assert smollm2_tokenizer.encode(text) == hf_smollm2.encode(text, add_special_tokens=False), text
    assert smollm2_tokenizer.encode_batch(texts) == [smollm2_tokenizer.encode(t) for t in texts]
    # Special tokens written in the text stay whole, as in transformers.
    assert smollm2_tokenizer.encode("<|im_start|>")[0] == 1


def test_smollm2_special_ids_and_round_trip(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.add_bos_default is False  # tokenizer.ggml.add_bos_token is false in this GGUF
    ids = tok.encode("Hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("Hello")
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(ids) == "<|im_start|>Hello<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "Hello"


def test_smollm2_digits_split_individually(smollm2_tokenizer):
    # SmolLM2's pre-tokenizer ("smollm") isolates every numeric character before the byte-level split.
    # transformers' GGUF loader omits that step; it only shows on non-ASCII numerics such as " ²"
    # (ASCII digits never merge in this vocabulary), so those are checked here, not against transformers.
    assert smollm2_tokenizer.encode("12345") == [smollm2_tokenizer.token_to_id(d) for d in "12345"]
    space = smollm2_tokenizer.token_to_id("Ġ")
    assert smollm2_tokenizer.encode(" ²") == [space] + smollm2_tokenizer.encode("²")


@pytest.mark.slow(reason="builds transformers' tokenizer from the GGUF")
def test_smollm2_chat_template_matches_transformers(smollm2_tokenizer, hf_smollm2):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "Name a prime."}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            ref = hf_smollm2.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == ref
    rendered = smollm2_tokenizer.apply_chat_template(conversations[0])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert smollm2_tokenizer.encode(rendered) == hf_smollm2.encode(rendered, add_special_tokens=False)


@pytest.mark.slow(reason="builds transformers' tokenizer from the GGUF")
def test_smollm2_save_load_round_trip(smollm2_tokenizer, tmp_path, hf_smollm2):
    smollm2_tokenizer.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert type(back) is type(smollm2_tokenizer)
    assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (1, 2, 2, 49152)
    assert back.chat_template == smollm2_tokenizer.chat_template and back.add_bos_default is False
    for text in TEXTS + [" x² ½"]:
        assert back.encode(text) == smollm2_tokenizer.encode(text)
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").encode("a 12") == smollm2_tokenizer.encode("a 12")
    # transformers reads the saved directory too.
    import transformers
    hf_back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf_back.encode(TEXTS[0], add_special_tokens=False) == smollm2_tokenizer.encode(TEXTS[0])
    assert hf_back.eos_token_id == 2


def test_hf_style_directory(smollm2_tokenizer, tmp_path):
    # An HF checkpoint layout: token strings (as AddedToken dicts), no ids, template in chat_template.jinja.
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text(smollm2_tokenizer.chat_template)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)


# ----------------------------------------------------------------------------------------------
# SentencePiece

@pytest.fixture(scope="module")
def sp_ref(sentencepiece_model):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))


def test_sentencepiece_matches_sentencepiece(sentencepiece_model, sp_ref):
    tok = load_tokenizer(sentencepiece_model)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.pad_id == 2  # the model has no pad piece: falls back to eos
    assert tok.add_bos_default is True  # Llama convention
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp_ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS, bos=True) == [[1] + sp_ref.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode("hi", bos=True, eos=True), skip_special=True) == "hi"
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_save_load_round_trip(sentencepiece_model, tmp_path):
    tok = load_tokenizer(sentencepiece_model)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    back = load_tokenizer(tmp_path)
    assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (1, 2, 2, 32000)
    assert back.add_bos_default is True
    assert back.chat_template == tok.chat_template
    assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"
    assert back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_llama_gguf_vocab_matches_sentencepiece(sentencepiece_model, sp_ref, tmp_path):
    # Write the SentencePiece vocabulary into a GGUF the way llama.cpp's converter does, read it back.
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    for text in TEXTS:
        assert tok.encode(text) == sp_ref.encode(text), text
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<s>q"
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(TEXTS[2]) == sp_ref.encode(TEXTS[2])


# ----------------------------------------------------------------------------------------------
# Bad input

def test_missing_and_empty(tmp_path):
    with pytest.raises(TokenizerError, match="nope.model: no such file"):
        load_tokenizer(tmp_path / "nope.model")
    assert load_tokenizer(tmp_path) is None  # a directory without tokenizer files


def test_corrupt_tokenizer_json(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    data = (tmp_path / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_bytes(data)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_sentencepiece_and_gguf(sentencepiece_model, tmp_path):
    data = sentencepiece_model.read_bytes()
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(TokenizerError, match="truncated.model: not a valid SentencePiece model"):
        load_tokenizer(truncated)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\xff garbage, not a protobuf \x13\x37" * 10)
    with pytest.raises(TokenizerError, match="tokenizer.model: not a valid SentencePiece model"):
        load_tokenizer(tmp_path)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(TokenizerError, match="bad.gguf"):
        load_tokenizer(bad_gguf)
