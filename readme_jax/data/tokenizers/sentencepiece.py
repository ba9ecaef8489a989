"""SentencePiece tokenizers: a ``tokenizer.model`` file, or the vocabulary of a ``llama``-model GGUF.

Wraps ``sentencepiece.SentencePieceProcessor``, so ids are exactly SentencePiece's. A GGUF with
``tokenizer.ggml.model == "llama"`` (Llama-1/2, Mistral) stores the pieces, their scores and types
rather than a model file; we write those into a SentencePiece ``ModelProto`` (BPE, identity
normalisation, dummy-prefix space unless ``tokenizer.ggml.add_space_prefix`` is false, byte fallback
when the vocabulary has ``<0x..>`` byte pieces) and load that. The protobuf is serialised by the small
encoder below, so no ``protobuf`` dependency is needed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from readme_jax.data.tokenizers.base import CONFIG_FILE, Tokenizer, one_line, resolve_special_ids
from readme_jax.errors import TokenizerError

# SentencePiece piece types (the same numbers as GGUF's token types).
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPE_BPE = 2


class SentencePieceTokenizer(Tokenizer):
    """A ``sentencepiece.SentencePieceProcessor`` behind the project's tokenizer interface."""

    def __init__(self, processor, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, add_bos_default: bool = True):
        super().__init__(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template,
                         add_bos_default=add_bos_default)
        self.processor = processor

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, config: dict[str, Any] | None = None) -> "SentencePieceTokenizer":
        """Load a SentencePiece ``.model``; ``config`` is the (parsed) ``tokenizer_config.json`` beside it."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read SentencePiece model ({one_line(e)})") from e
        return cls.from_serialized(data, config, source=str(path))

    @classmethod
    def from_serialized(cls, data: bytes, config: dict[str, Any] | None = None, *,
                        source: str = "<bytes>") -> "SentencePieceTokenizer":
        """Load a serialised SentencePiece ``ModelProto``."""
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        try:
            if not data:
                raise ValueError("empty file")
            processor.LoadFromSerializedProto(data)
            if processor.get_piece_size() == 0:
                raise ValueError("no pieces")
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError
            raise TokenizerError(f"{source}: not a valid SentencePiece model file ({one_line(e)})") from e
        config = config or {}

        def own(value: int) -> int | None:
            return value if value >= 0 else None

        defaults = {"bos": own(processor.bos_id()), "eos": own(processor.eos_id()), "pad": own(processor.pad_id())}
        ids = resolve_special_ids(config, lambda t: own(processor.piece_to_id(t)) if _has_piece(processor, t)
                                  else None, defaults)
        return cls(processor, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   chat_template=config.get("chat_template"),
                   add_bos_default=bool(config.get("add_bos_token", True)))  # Llama's convention

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "SentencePieceTokenizer":
        """Build from the ``tokenizer.*`` metadata of a ``llama``-model GGUF (see module docstring)."""
        name = meta["_source"]
        tokens = list(meta["tokenizer.ggml.tokens"])
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        types = list(meta.get("tokenizer.ggml.token_type") or [PIECE_NORMAL] * len(tokens))
        if not (len(tokens) == len(scores) == len(types)):
            raise TokenizerError(f"{name}: {len(tokens)} tokens, {len(scores)} scores, {len(types)} token types")

        def special(key):
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        unk = special("unknown_token_id")
        if unk is None:
            unk = next((i for i, t in enumerate(types) if t == PIECE_UNKNOWN), None)
        if unk is None:
            raise TokenizerError(f"{name}: SentencePiece GGUF vocabulary has no unknown token")
        types = [PIECE_UNKNOWN if i == unk else (PIECE_NORMAL if t == PIECE_UNKNOWN else t)
                 for i, t in enumerate(types)]
        bos, eos, pad = special("bos_token_id"), special("eos_token_id"), special("padding_token_id")
        proto = build_model_proto(
            tokens, scores, types, unk_id=unk, bos_id=bos, eos_id=eos,
            pad_id=pad if pad is not None and pad not in (unk, bos, eos) else None,
            add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            precompiled_charsmap=bytes(meta.get("tokenizer.ggml.precompiled_charsmap") or b""))
        tok = cls.from_serialized(proto, source=name)
        tok.bos_id = bos if bos is not None else tok.bos_id
        tok.eos_id = eos if eos is not None else tok.eos_id
        tok.pad_id = pad if pad is not None else (tok.eos_id if tok.eos_id is not None else 0)
        tok.chat_template = meta.get("tokenizer.chat_template") or None
        # llama.cpp prepends BOS to a SentencePiece vocabulary unless the file says otherwise.
        tok.add_bos_default = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and tok.bos_id is not None
        return tok

    # -- Tokenizer API --------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.processor.encode(list(texts))] if texts else []

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """SentencePiece's decoding; control tokens (``<s>``) are written out unless ``skip_special``."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.processor.decode([i for i in ids if not self.processor.is_control(i)])
        out, run = [], []
        for i in ids:
            if self.processor.is_control(i):
                if run:
                    out.append(self.processor.decode(run))
                    run = []
                out.append(self.processor.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.processor.decode(run))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        return self.processor.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        return self.processor.piece_to_id(token) if _has_piece(self.processor, token) else None

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` and ``tokenizer_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "tokenizer.json").exists():
            raise TokenizerError(f"{directory / 'tokenizer.json'}: exists and would shadow the saved "
                                 "tokenizer.model when loading; save into another directory")
        (directory / "tokenizer.model").write_bytes(self.processor.serialized_model_proto())
        config = self._config_dict("sentencepiece")
        config["tokenizer_class"] = "LlamaTokenizer"
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        return directory


def _has_piece(processor, token: str) -> bool:
    """piece_to_id returns unk for unknown strings; tell those apart from the unk piece itself."""
    token_id = processor.piece_to_id(token)
    return processor.id_to_piece(token_id) == token


# ---------------------------------------------------------------------------------------------
# A minimal protobuf writer for sentencepiece_model.proto (only the fields we set).


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 -> two's complement, ten bytes
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", float(value))


def build_model_proto(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, unk_id: int,
                      bos_id: int | None, eos_id: int | None, pad_id: int | None, add_dummy_prefix: bool = True,
                      precompiled_charsmap: bytes = b"") -> bytes:
    """Serialise a SentencePiece BPE ``ModelProto`` for the given pieces (Llama conventions)."""
    pieces = b"".join(
        _field_bytes(1, _field_bytes(1, tok.encode("utf-8")) + _field_float(2, score) + _field_varint(3, kind))
        for tok, score, kind in zip(tokens, scores, types))

    def piece(index):
        return tokens[index].encode("utf-8")

    trainer = _field_varint(3, MODEL_TYPE_BPE) + _field_varint(4, len(tokens))
    trainer += _field_varint(35, any(t == PIECE_BYTE for t in types))
    trainer += _field_varint(40, unk_id) + _field_varint(41, -1 if bos_id is None else bos_id)
    trainer += _field_varint(42, -1 if eos_id is None else eos_id) + _field_varint(43, -1 if pad_id is None else pad_id)
    trainer += _field_bytes(45, piece(unk_id))
    if bos_id is not None:
        trainer += _field_bytes(46, piece(bos_id))
    if eos_id is not None:
        trainer += _field_bytes(47, piece(eos_id))
    if pad_id is not None:
        trainer += _field_bytes(48, piece(pad_id))
    normalizer = _field_bytes(1, b"identity") + _field_bytes(2, precompiled_charsmap)
    normalizer += _field_varint(3, add_dummy_prefix) + _field_varint(4, False) + _field_varint(5, True)
    return pieces + _field_bytes(2, trainer) + _field_bytes(3, normalizer)
