"""Pick and load the tokenizer implementation for a path: an HF directory, ``tokenizer.json``, a
SentencePiece model or a GGUF's ``tokenizer.ggml.*`` metadata.

    tok = load_tokenizer(path)          # HF dir, tokenizer.json, tokenizer.model or .gguf
    tok = tokenizer_from_gguf(reader)   # a gguf.GGUFReader (or a path)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from readme_jax.data.tokenizers.base import CONFIG_FILE, Tokenizer, one_line
from readme_jax.errors import TokenizerError
from readme_jax.data.tokenizers.bpe import BPETokenizer
from readme_jax.data.tokenizers.sentencepiece import SentencePieceTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """Load the tokenizer at ``path``.

    ``path`` may be a directory (``tokenizer.json`` is preferred, else ``tokenizer.model``, else a single
    ``.gguf`` file in it; ``tokenizer_config.json`` / ``chat_template.jinja`` supply special tokens and
    the chat template), a ``tokenizer.json`` file, a SentencePiece ``.model`` file, or a ``.gguf`` file.
    Returns None for a directory that holds no tokenizer files. Raises :class:`TokenizerError` naming
    the file when a file is missing or malformed.
    """
    path = Path(path)
    if path.is_dir():
        config = _read_hf_config(path)
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_file(path / "tokenizer.json", config)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer.from_file(path / "tokenizer.model", config)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return tokenizer_from_gguf(ggufs[0])
        return None
    if not path.exists():
        raise TokenizerError(f"{path}: no such file (expected a tokenizer.json, a SentencePiece .model, "
                             "a .gguf file, or a directory holding one)")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.suffix == ".json" or _looks_like_json(path):
        return BPETokenizer.from_file(path, _read_hf_config(path.parent))
    # Anything else is taken as a SentencePiece model (tokenizer.model, tokenizer.model.v1, *.spm ...).
    return SentencePieceTokenizer.from_file(path, _read_hf_config(path.parent))


def tokenizer_from_gguf(source) -> Tokenizer:
    """The tokenizer stored in a GGUF's ``tokenizer.ggml.*`` metadata.

    ``source`` is a ``gguf.GGUFReader`` or a path. Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level
    BPE; SmolLM2) and ``"llama"`` (SentencePiece BPE with scores; Llama-1/2, Mistral).
    """
    meta = read_gguf_tokenizer_metadata(source)
    name = meta["_source"]
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return BPETokenizer.from_gguf_metadata(meta)
    if kind == "llama":
        return SentencePieceTokenizer.from_gguf_metadata(meta)
    raise TokenizerError(f"{name}: GGUF tokenizer model {kind!r} is not supported "
                         "(expected tokenizer.ggml.model 'gpt2' or 'llama')")


def read_gguf_tokenizer_metadata(source) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF as plain Python values (plus ``_source``, its name)."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading a GGUF needs the gguf package: pip install gguf") from e
    if isinstance(source, gguf.GGUFReader):
        reader = source
        name = str(getattr(getattr(source, "data", None), "filename", None) or "<GGUFReader>")
    else:
        name = str(source)
        if not Path(source).is_file():
            raise TokenizerError(f"{name}: no such file (expected a .gguf file)")
        try:
            reader = gguf.GGUFReader(source)
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, OSError ...
            raise TokenizerError(f"{name}: not a readable GGUF file ({one_line(e)})") from e
    meta: dict[str, Any] = {"_source": name}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                meta[key] = field.contents()
            except Exception as e:  # noqa: BLE001
                raise TokenizerError(f"{name}: GGUF field {key} is malformed ({one_line(e)})") from e
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{name}: GGUF has no tokenizer (no tokenizer.ggml.tokens metadata)")
    return meta


def _looks_like_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({one_line(e)})") from e
    return head.startswith(b"{")


def _read_hf_config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of a directory (empty if absent), with ``chat_template.jinja`` folded in
    and token entries normalised to strings."""
    config: dict[str, Any] = {}
    cfg_path = directory / CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: not a valid JSON tokenizer config ({one_line(e)})") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_path}: expected a JSON object")
    special_map = directory / "special_tokens_map.json"
    if special_map.is_file():
        try:
            extra = json.loads(special_map.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{special_map}: not valid JSON ({one_line(e)})") from e
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if config.get(key) is None and isinstance(extra, dict) and extra.get(key) is not None:
                config[key] = extra[key]
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file() and not config.get("chat_template"):
        config["chat_template"] = jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = by_name.get("default") or next(iter(by_name.values()), None)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialisation {"content": "<s>", ...}
            config[key] = value.get("content")
    return config

