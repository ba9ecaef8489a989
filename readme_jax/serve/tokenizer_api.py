"""vLLM's tokenizer endpoints, which lm-evaluation-harness detects and uses to tokenise on the client:
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, with vLLM's request and response shapes.

    ids = parse_tokenize({"prompt": "Hello", "add_special_tokens": False}, tokenizer, model_name="m",
                         max_prompt_chars=None)
    {"count": len(ids), "max_model_len": 2048, "tokens": ids, "token_strs": None}      # the /tokenize answer
    parse_detokenize({"tokens": ids}, tokenizer, model_name="m")  ->  ids; {"prompt": tokenizer.decode(ids)}
"""

from __future__ import annotations

from typing import Any

from readme_jax.errors import APIError
from readme_jax.serve.chat_messages import chat_prompt_ids
from readme_jax.serve.request_body import QUOTE_CHARS, bad_request, check_chars, check_type, quote, token_ids


def tokenizer_info(tokenizer, max_model_len: int) -> dict:
    """vLLM's ``GET /tokenizer_info``: the tokenizer's class, special tokens, chat template and context (lm-eval
    reads ``eos_token`` / ``bos_token`` / ``chat_template`` from it)."""
    return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "chat_template": tokenizer.chat_template,
            "add_bos_token": tokenizer.add_bos_default, "add_eos_token": False, "model_max_length": max_model_len,
            "vocab_size": tokenizer.vocab_size}


def _check_model(data, model_name: str) -> None:
    if data.get("model") is not None and data["model"] != model_name:
        raise APIError(404, f"model: {quote(data['model'])} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def parse_tokenize(data: dict[str, Any], tokenizer, *, model_name: str, max_prompt_chars: int | None) -> list[int]:
    """vLLM's ``POST /tokenize`` body -> token ids: ``{"prompt", "add_special_tokens" (true)}`` or
    ``{"messages", "add_generation_prompt" (true)}``, with optional ``model`` and ``return_token_strs``."""
    kind = "messages" if "messages" in data else "prompt"
    allowed = {"model", "return_token_strs", kind} | (
        {"add_special_tokens"} if kind == "prompt" else {"add_generation_prompt", "add_special_tokens"})
    for name in sorted(data):
        if name not in allowed:
            raise bad_request(name[:QUOTE_CHARS], "unknown or unsupported parameter")
    _check_model(data, model_name)
    for name in ("return_token_strs", "add_special_tokens", "add_generation_prompt"):
        if data.get(name) is not None:
            check_type(name, data[name], (bool,), "a boolean")
    if kind == "messages":
        if data.get("add_generation_prompt") is False:
            raise bad_request("add_generation_prompt", "only true is supported")
        return chat_prompt_ids(data["messages"], tokenizer, max_prompt_chars)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt", f"expected a string, got {quote(prompt)}")
    check_chars("prompt", prompt, max_prompt_chars)
    return tokenizer.encode(prompt, bos=tokenizer.add_bos_default and data.get("add_special_tokens", True))


def parse_detokenize(data: dict[str, Any], tokenizer, *, model_name: str) -> list[int]:
    """vLLM's ``POST /detokenize`` body ``{"tokens": [...], "model"?}`` -> the token ids."""
    for name in sorted(data):
        if name not in ("model", "tokens"):
            raise bad_request(name[:QUOTE_CHARS], "unknown or unsupported parameter")
    _check_model(data, model_name)
    if "tokens" not in data:
        raise bad_request("tokens", "required field is missing")
    return token_ids(data["tokens"], tokenizer, "tokens")
