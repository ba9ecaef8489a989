"""The project's tokenizer interface and the loaders that pick an implementation for a path.

One small interface, two implementations:

* :class:`readme_jax.data.bpe.BPETokenizer` wraps a ``tokenizers.Tokenizer``: an HF ``tokenizer.json``
  or the byte-level BPE a GGUF stores in its ``tokenizer.ggml.*`` metadata (SmolLM2);
* :class:`readme_jax.data.sentencepiece_tok.SentencePieceTokenizer` wraps a ``sentencepiece`` model:
  a ``tokenizer.model`` file or the SentencePiece vocabulary of a ``llama``-style GGUF.

Usage::

    tok = load_tokenizer(path)          # HF dir, tokenizer.json, tokenizer.model or .gguf
    ids = tok.encode("Hello", bos=True)
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

``encode`` never adds special tokens on its own (the ``bos`` / ``eos`` flags do), and special tokens
written in the text (e.g. ``<|im_start|>``) map to their ids for ``tokenizers``-backed tokenizers, as
in transformers. Chat templates render with a sandboxed jinja2 environment configured as
transformers configures it (``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``).
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Name of the small JSON file written next to the vocabulary by :meth:`Tokenizer.save`. It uses
#: transformers' file name and key names, so transformers reads the saved directory as well.
CONFIG_FILE = "tokenizer_config.json"
#: Marker key in a config written by this project (its value is the implementation kind).
CONFIG_MARKER = "readme_jax_tokenizer"


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or malformed (the message names the file)."""


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


# ---------------------------------------------------------------------------------------------
# Chat templates


def render_chat_template(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                         special_tokens: dict[str, str | None] | None = None, **kwargs: Any) -> str:
    """Render a jinja2 chat template the way transformers does (sandboxed, trimmed blocks)."""
    compiled = _compile_template(template)
    context = {k: v for k, v in (special_tokens or {}).items()}
    context.update(kwargs)
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(template: str):
    if template in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[template]
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with transformers and torch
        raise ImportError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid jinja2: {e}") from e
    _TEMPLATE_CACHE[template] = compiled
    return compiled


# ---------------------------------------------------------------------------------------------
# Loading


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
            return _load_tokenizer_json(path / "tokenizer.json", config)
        if (path / "tokenizer.model").is_file():
            return _load_sentencepiece(path / "tokenizer.model", config)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return tokenizer_from_gguf(ggufs[0])
        return None
    if not path.exists():
        raise TokenizerError(f"{path}: no such file (expected a tokenizer.json, a SentencePiece .model, "
                             "a .gguf file, or a directory holding one)")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.suffix == ".json":
        return _load_tokenizer_json(path, _read_hf_config(path.parent))
    if _looks_like_json(path):
        return _load_tokenizer_json(path, _read_hf_config(path.parent))
    # Anything else is taken as a SentencePiece model (tokenizer.model, tokenizer.model.v1, *.spm ...).
    return _load_sentencepiece(path, _read_hf_config(path.parent))


def tokenizer_from_gguf(source) -> Tokenizer:
    """The tokenizer stored in a GGUF's ``tokenizer.ggml.*`` metadata.

    ``source`` is a ``gguf.GGUFReader`` or a path. Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level
    BPE; SmolLM2) and ``"llama"`` (SentencePiece BPE with scores; Llama-1/2, Mistral).
    """
    meta = read_gguf_tokenizer_metadata(source)
    name = meta["_source"]
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        from readme_jax.data.bpe import BPETokenizer
        return BPETokenizer.from_gguf_metadata(meta)
    if kind == "llama":
        from readme_jax.data.sentencepiece_tok import SentencePieceTokenizer
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
            raise TokenizerError(f"{name}: not a readable GGUF file ({_one_line(e)})") from e
    meta: dict[str, Any] = {"_source": name}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                meta[key] = field.contents()
            except Exception as e:  # noqa: BLE001
                raise TokenizerError(f"{name}: GGUF field {key} is malformed ({_one_line(e)})") from e
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{name}: GGUF has no tokenizer (no tokenizer.ggml.tokens metadata)")
    return meta


def _looks_like_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({_one_line(e)})") from e
    return head.startswith(b"{")


def _load_tokenizer_json(path: Path, config: dict[str, Any]) -> Tokenizer:
    from readme_jax.data.bpe import BPETokenizer
    return BPETokenizer.from_file(path, config)


def _load_sentencepiece(path: Path, config: dict[str, Any]) -> Tokenizer:
    from readme_jax.data.sentencepiece_tok import SentencePieceTokenizer
    return SentencePieceTokenizer.from_file(path, config)


def _read_hf_config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of a directory (empty if absent), with ``chat_template.jinja`` folded in
    and token entries normalised to strings."""
    config: dict[str, Any] = {}
    cfg_path = directory / CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{cfg_path}: not a valid JSON tokenizer config ({_one_line(e)})") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_path}: expected a JSON object")
    special_map = directory / "special_tokens_map.json"
    if special_map.is_file():
        try:
            extra = json.loads(special_map.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{special_map}: not valid JSON ({_one_line(e)})") from e
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


def resolve_special_ids(config: dict[str, Any], token_to_id, defaults: dict[str, int | None]) -> dict[str, int | None]:
    """bos/eos/pad ids from a config: explicit ``*_token_id`` first, then the token strings, then defaults."""
    out = {}
    for name in ("bos", "eos", "pad"):
        value = config.get(f"{name}_token_id")
        if value is None and config.get(f"{name}_token") is not None:
            value = token_to_id(config[f"{name}_token"])
        out[name] = int(value) if value is not None else defaults.get(name)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
