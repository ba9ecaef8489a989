"""Tokenizers backed by the ``tokenizers`` package: HF ``tokenizer.json`` files and GGUF byte-level BPE.

A GGUF whose ``tokenizer.ggml.model`` is ``"gpt2"`` stores a GPT-2-style byte-level BPE: the vocabulary
(already spelled in the GPT-2 byte alphabet, ``Ġ`` for a space), the merges (``"Ġ t"``), token types
(3 = control, 4 = user-defined) and a pre-tokenizer name in ``tokenizer.ggml.pre``. We rebuild it as a
``tokenizers.Tokenizer``:

* model: ``BPE(vocab, merges)``, no unknown token, no byte fallback (every byte has a token);
* pre-tokenizer by ``tokenizer.ggml.pre``: ``smollm`` (SmolLM2) splits every digit off on its own and
  then applies GPT-2's regex + byte mapping, as SmolLM2's own ``tokenizer.json`` does; ``gpt2`` /
  ``default`` are GPT-2's regex alone; ``llama-bpe`` / ``llama3`` are Llama-3's regex;
* decoder: ``ByteLevel``; control tokens become special added tokens, so ``<|im_start|>`` written in the
  text maps to its id.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from readme_jax.data.tokenizers.base import CONFIG_FILE, Tokenizer, one_line, resolve_special_ids
from readme_jax.errors import TokenizerError

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# Llama-3's pre-tokenizer regex (tiktoken cl100k-style): contractions, letter runs with an optional
# leading non-letter, numbers in groups of up to three, punctuation runs, newlines, whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


def gguf_pre_tokenizer(name: str | None):
    """The ``tokenizers`` pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name not in (None, "default", "gpt2", "gpt-2"):
        log.warning("GGUF pre-tokenizer %r is not known here; using GPT-2's split regex", name)
    return byte_level


class BPETokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (any model kind; byte-level BPE when built from a GGUF)."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, add_bos_default: bool = False):
        super().__init__(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template,
                         add_bos_default=add_bos_default)
        self.backend = backend  # tokenizers.Tokenizer

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, config: dict[str, Any] | None = None) -> "BPETokenizer":
        """Load an HF ``tokenizer.json``; ``config`` is the (parsed) ``tokenizer_config.json`` beside it."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from e
        config = config or {}
        defaults = {"bos": _first_present(backend, _BOS_GUESSES), "eos": _first_present(backend, _EOS_GUESSES),
                    "pad": None}
        ids = resolve_special_ids(config, backend.token_to_id, defaults)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: does the file's post-processor prepend BOS?
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = ids["bos"] is not None and bool(probe) and probe[0] == ids["bos"]
        return cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   chat_template=config.get("chat_template"), add_bos_default=bool(add_bos))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "BPETokenizer":
        """Build from the ``tokenizer.*`` metadata of a ``gpt2``-model GGUF (see module docstring)."""
        from tokenizers import AddedToken, Tokenizer as Backend, decoders, models

        name = meta["_source"]
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges_raw = meta.get("tokenizer.ggml.merges")
        if not merges_raw:
            raise TokenizerError(f"{name}: byte-level BPE GGUF has no tokenizer.ggml.merges")
        if len(types) != len(tokens):
            raise TokenizerError(f"{name}: {len(tokens)} tokens but {len(types)} token types")

        alphabet = byte_alphabet()
        spelled = set(alphabet.values())
        vocab: dict[str, int] = {}
        for index, (token, kind) in enumerate(zip(tokens, types)):
            if kind != TOKEN_CONTROL and not set(token) <= spelled:
                # A token stored as raw text rather than in the byte alphabet: re-spell its UTF-8 bytes.
                token = "".join(alphabet[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, index)
        merges = []
        for merge in merges_raw:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{name}: malformed merge {merge!r} (expected 'left right')")
            merges.append((parts[0], parts[1]))

        backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                     fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        control = [AddedToken(t, special=True, normalized=False)
                   for t, k in zip(tokens, types) if k == TOKEN_CONTROL and set(t) <= spelled]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        def special(key):
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        return cls(backend, bos_id=special("bos_token_id"), eos_id=special("eos_token_id"),
                   pad_id=special("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_default=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    # -- Tokenizer API --------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (transformers can read both too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = self._config_dict("tokenizers")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        return directory


def _first_present(backend, candidates: Sequence[str]) -> int | None:
    for token in candidates:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
