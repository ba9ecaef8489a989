"""The project's tokenizer interface: text <-> ids, special ids, chat template, saved config.

Implementations: :class:`readme_jax.data.tokenizers.bpe.BPETokenizer` (``tokenizers``-backed: HF
``tokenizer.json`` or a GGUF's byte-level BPE) and
:class:`readme_jax.data.tokenizers.sentencepiece.SentencePieceTokenizer` (a ``sentencepiece`` model or a
``llama``-style GGUF vocabulary); :mod:`readme_jax.data.tokenizers.factory` picks one for a path.

``encode`` never adds special tokens on its own (the ``bos`` / ``eos`` flags do), and special tokens
written in the text (e.g. ``<|im_start|>``) map to their ids for ``tokenizers``-backed tokenizers, as
in transformers.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from readme_jax.data.tokenizers.chat_template import render_chat_template

#: Name of the small JSON file written next to the vocabulary by :meth:`Tokenizer.save`. It uses
#: transformers' file name and key names, so transformers reads the saved directory as well.
CONFIG_FILE = "tokenizer_config.json"
#: Marker key in a config written by this project (its value is the implementation kind).
CONFIG_MARKER = "readme_jax_tokenizer"


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the special ids and the chat template of the source.

    Subclasses implement :meth:`_encode`, :meth:`_encode_batch`, :meth:`decode`, :meth:`id_to_token`,
    :meth:`token_to_id`, :attr:`vocab_size` and :meth:`save`; this class holds the special ids and the
    chat template and adds ``bos`` / ``eos`` around encodings.

    ``add_bos_default`` records whether the source prepends BOS when asked for "special tokens" (the
    ``add_bos_token`` flag of transformers / GGUF); :meth:`encode` itself never does, callers decide.
    """

    def __init__(self, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, add_bos_default: bool = False):
        self.add_bos_default = bool(add_bos_default) and bos_id is not None
        self.bos_id = bos_id
        self.eos_id = eos_id
        # pad falls back to eos, else 0, so batching code always has an id to fill with.
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.chat_template = chat_template or None

    # -- implemented by subclasses --------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added."""

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; ``decode(encode(x)) == x``. Special tokens are kept unless ``skip_special``."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (as spelled in the vocabulary) for ``token_id``, or None."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token``, or None."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special and added tokens included."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write files that :func:`load_tokenizer` reads back identically; returns ``directory``."""

    # -- shared ---------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first / EOS last when asked."""
        return self._wrap(self._encode(text), bos, eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """:meth:`encode` of every text (unpadded lists)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not a string")
        return [self._wrap(ids, bos, eos) for ids in self._encode_batch(list(texts))]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; call encode(..., bos=False)")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token; call encode(..., eos=False)")
            ids = [*ids, self.eos_id]
        return ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        return self.id_to_token(self.pad_id)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the source's chat template.

        Extra keyword arguments (e.g. ``tools``) become template variables, as in transformers.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (the source defines none); "
                             "format the prompt yourself or load a tokenizer that has one")
        return render_chat_template(
            self.chat_template, list(messages), add_generation_prompt=add_generation_prompt,
            special_tokens={"bos_token": self.bos_token, "eos_token": self.eos_token,
                            "pad_token": self.pad_token}, **kwargs)

    def _config_dict(self, kind: str) -> dict[str, Any]:
        """The ``tokenizer_config.json`` written by :meth:`save` (transformers' keys plus ids)."""
        return {
            CONFIG_MARKER: kind,
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id,
            "add_bos_token": self.add_bos_default, "add_eos_token": False,
            "chat_template": self.chat_template,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, chat_template={self.chat_template is not None})")


def resolve_special_ids(config: dict[str, Any], token_to_id, defaults: dict[str, int | None]) -> dict[str, int | None]:
    """bos/eos/pad ids from a config: explicit ``*_token_id`` first, then the token strings, then defaults."""
    out = {}
    for name in ("bos", "eos", "pad"):
        value = config.get(f"{name}_token_id")
        if value is None and config.get(f"{name}_token") is not None:
            value = token_to_id(config[f"{name}_token"])
        out[name] = int(value) if value is not None else defaults.get(name)
    return out


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line error messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
