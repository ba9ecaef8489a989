"""The OpenAI wire format: request parsing and validation, response and stream-chunk builders, errors.

    req = parse_completion(body, tokenizer, model_name="smollm2", max_model_len=2048, default_max_tokens=16)
    req.prompt_ids, req.params (a validated SamplingParams), req.stream, req.include_usage
    completion_response(req_id, created, model, text, finish_reason, usage)       # -> dict (JSON body)

Every field a request may carry is listed here. A field this server does not implement is accepted only at
the value that means "off" (``n`` 1, ``logprobs`` null, ``echo`` false, penalties 0, ...); any other value,
and any field not listed, is a 400 naming it: nothing is silently ignored. Sampling values are checked by
the one validator (:class:`readme_jax.sampling.SamplingParams`), so a bad ``top_p`` gets the same message
here as in ``generate``. Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

from readme_jax.errors import APIError, SamplingError
from readme_jax.sampling import SamplingParams

#: OpenAI's default temperature and top_p (the API samples unless asked for temperature 0).
DEFAULT_TEMPERATURE = 1.0
ROLES = ("system", "user", "assistant")


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A parsed /v1/completions or /v1/chat/completions request."""

    kind: str                       # "completion" | "chat"
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


# --- field checks ------------------------------------------------------------------------------------------

def _off(*allowed):
    """A check for an unsupported field: only the listed "off" values pass."""
    def check(name, value):
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise bad_request(name, f"not supported by this server (only {shown} is accepted), got "
                                    f"{json.dumps(value)}")
    return check


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type(name, value, kinds, what):
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise bad_request(name, f"expected {what}, got {json.dumps(value)}")


_UNSUPPORTED_COMMON = {
    "n": _off(1, None), "presence_penalty": _off(0, 0.0, None), "frequency_penalty": _off(0, 0.0, None),
    "logit_bias": _off(None, {}), "best_of": _off(1, None), "response_format": _off(None, {"type": "text"}),
    "tools": _off(None, []), "tool_choice": _off(None, "none"), "functions": _off(None, []),
    "function_call": _off(None, "none"), "parallel_tool_calls": _off(None), "top_logprobs": _off(None, 0),
}
_UNSUPPORTED = {
    "completion": {**_UNSUPPORTED_COMMON, "logprobs": _off(None, 0), "echo": _off(False, None),
                   "suffix": _off(None, "")},
    "chat": {**_UNSUPPORTED_COMMON, "logprobs": _off(False, None)},
}
_SUPPORTED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
              "ignore_eos", "stop_token_ids"}
_REQUIRED = {"completion": "prompt", "chat": "messages"}


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(None, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _prompt_ids(value, tokenizer) -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]                                   # a batch of one
    if isinstance(value, str):
        return tokenizer.encode(value, bos=tokenizer.add_bos_default)
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        bad = next((t for t in value if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request("prompt", f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})")
        return [int(t) for t in value]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad_request("prompt", f"a batch of {len(value)} prompts is not supported; send one per request")
    raise bad_request("prompt", f"expected a string or a non-empty list of token ids, got {json.dumps(value)[:80]}")


def _chat_prompt_ids(messages, tokenizer) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "expected a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(where, f"expected an object, got {json.dumps(m)[:80]}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise bad_request(f"{where}.{extra[0]}", "not supported by this server")
        if m.get("role") not in ROLES:
            raise bad_request(f"{where}.role", f"expected one of {list(ROLES)}, got {json.dumps(m.get('role'))}")
        content = m.get("content")
        if isinstance(content, list):                      # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       and set(p) == {"type", "text"} for p in content):
                raise bad_request(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                      "are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content", f"expected a string, got {json.dumps(content)[:80]}")
        clean.append({"role": m["role"], "content": content})
    if not tokenizer.chat_template:
        raise bad_request("messages", "this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    return tokenizer.encode(text)


def _sampling(data, kind, prompt_len, max_model_len, default_max_tokens) -> SamplingParams:
    max_tokens = data.get("max_tokens")
    if kind == "chat" and data.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise bad_request("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_tokens = data["max_completion_tokens"]
    if max_tokens is None:                     # the stated default, shortened to what the context has left
        max_tokens = min(default_max_tokens, max_model_len - prompt_len) if prompt_len < max_model_len \
            else default_max_tokens
    stop = data.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, list):
        raise bad_request("stop", f"expected a string or a list of strings, got {json.dumps(stop)}")
    stop_ids = data.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)):
        raise bad_request("stop_token_ids", f"expected a list of token ids, got {json.dumps(stop_ids)}")
    ignore_eos = data.get("ignore_eos", False)
    _type("ignore_eos", ignore_eos, (bool,), "a boolean")
    temperature = data.get("temperature")
    top_p = data.get("top_p")
    try:
        return SamplingParams(temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, max_tokens=max_tokens, seed=data.get("seed"),
                              stop=tuple(stop), stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos)
    except SamplingError as e:
        raise bad_request(e.param, str(e).split(": ", 1)[-1]) from None


def parse_request(kind: str, data: dict[str, Any], tokenizer, *, model_name: str, max_model_len: int,
                  default_max_tokens: int) -> GenerationRequest:
    """Validate one request body (already a JSON object) of ``kind`` "completion" or "chat"."""
    unsupported = _UNSUPPORTED[kind]
    allowed = _SUPPORTED | set(unsupported) | {_REQUIRED[kind]} | ({"max_completion_tokens"} if kind == "chat"
                                                                   else set())
    for name in sorted(data):
        if name not in allowed:
            raise bad_request(name, "unknown or unsupported parameter")
        if name in unsupported:
            unsupported[name](name, data[name])
    for name in ("model", _REQUIRED[kind]):
        if name not in data:
            raise bad_request(name, "required field is missing")
    _type("model", data["model"], (str,), "a string")
    if data["model"] != model_name:
        raise APIError(404, f"model: {data['model']!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if data.get("user") is not None:
        _type("user", data["user"], (str,), "a string")
    stream = data.get("stream", False)
    if stream is not None:
        _type("stream", stream, (bool,), "a boolean")
    stream = bool(stream)
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("stream_options", f"expected {{\"include_usage\": bool}}, got {json.dumps(options)}")
        include_usage = options.get("include_usage", False)
        _type("stream_options.include_usage", include_usage, (bool,), "a boolean")
    if kind == "chat":
        prompt_ids = _chat_prompt_ids(data["messages"], tokenizer)
    else:
        prompt_ids = _prompt_ids(data["prompt"], tokenizer)
    params = _sampling(data, kind, len(prompt_ids), max_model_len, default_max_tokens)
    return GenerationRequest(kind, data["model"], prompt_ids, params, stream, include_usage)


# --- responses ---------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, text: str, finish_reason: str | None, *, delta: bool, role: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        d = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def response(kind: str, request_id: str, created: int, model: str, text: str, finish_reason: str,
             use: dict[str, int]) -> dict:
    """The non-streamed body of a completion ("text_completion") or a chat completion."""
    obj = "text_completion" if kind == "completion" else "chat.completion"
    return {"id": request_id, "object": obj, "created": created, "model": model,
            "choices": [_choice(kind, text, finish_reason, delta=False)], "usage": use}


def chunk(kind: str, request_id: str, created: int, model: str, text: str = "", finish_reason: str | None = None,
          *, role: bool = False, use: dict[str, int] | None = None, include_usage: bool = False) -> dict:
    """One streamed chunk. ``use`` given: the final usage chunk (no choices). With ``include_usage`` every
    other chunk carries ``"usage": null``, as OpenAI's do."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    out = {"id": request_id, "object": obj, "created": created, "model": model,
           "choices": [] if use is not None else [_choice(kind, text, finish_reason, delta=True, role=role)]}
    if use is not None or include_usage:
        out["usage"] = use
    return out


def sse(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or ``data: [DONE]``)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "readme_jax",
                                        "max_model_len": max_model_len}]}
