"""The OpenAI / vLLM request format: parsing and validation of /v1/completions and /v1/chat/completions
bodies, and the error shape.

    data = parse_json(body)                                        # 400: not JSON, nested too deep, bad Unicode
    req = parse_request("completion", data, tokenizer, model_name="smollm2", max_model_len=2048,
                        default_max_tokens=16)
    req.prompts (token ids of each prompt), req.n, req.params (a validated SamplingParams), req.stream, ...

Every field a request may carry is listed here (``fields``), with what it answers: implemented (every OpenAI / vLLM
sampling field, logprobs, completions' ``echo``: with ``logprobs`` k it asks for the prompt's logprobs too, chat's
``echo`` (vLLM's: the last message's content first when it is the assistant's), vLLM's ``prompt_logprobs`` k: each
prompt token's logprob and rank with k alternatives), or accepted only at its neutral value (the value that means
"off": ``best_of`` = n, ``min_tokens`` 0, ...). A field not listed is a 400 naming it: nothing is silently ignored.
Sampling values are checked by the one validator (:class:`readme_jax.sampling.SamplingParams`), so a bad ``top_p``
gets the same message here as in ``generate``. Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` and quote at most ``QUOTE_CHARS`` characters of a value.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from readme_jax.errors import APIError, SamplingError
from readme_jax.sampling import MAX_LOGPROBS, NEUTRAL_PROCESSORS, SamplingParams
from readme_jax.serve.api import check_priority
from readme_jax.serve.chat_messages import chat_echo, chat_prompt_ids
from readme_jax.serve.request_body import (QUOTE_CHARS, bad_request, check_chars, check_type, is_int, quote,
                                           token_ids)

#: OpenAI's default temperature (the API samples unless asked for temperature 0).
DEFAULT_TEMPERATURE = 1.0
#: Choices per request (prompts x n): lm-eval sends its batch as one list of prompts.
MAX_CHOICES = 64
#: lm-eval sends every `until` string plus EOS as `stop`, so more than OpenAI's 4.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 16 * 1024


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A parsed /v1/completions or /v1/chat/completions request: ``n`` samples of each prompt, choice index
    ``prompt_index * n + sample_index`` (vLLM's order)."""

    kind: str                       # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    tokens_as_ids: bool = False              # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
    priority: int = 0                        # vLLM's: lower is admitted first and preempted last
    prompt_logprobs: int | None = None       # vLLM's field: alternatives per prompt token in its own format
    echo_text: str = ""                      # chat echo: the text each choice's content starts with

    @property
    def logprobs(self) -> int | None:
        """Alternatives per token when the request asked for logprobs (0 = the chosen token's only), else None."""
        return self.params.logprobs

    def choice_params(self, index: int) -> SamplingParams:
        """The settings of choice ``index``: a seeded request's j-th sample uses seed + j (as vLLM's n > 1)."""
        j = index % self.n
        if j == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + j) % (2**31 - 1))


# --- field table -------------------------------------------------------------------------------------------

def _neutral(*allowed):
    """A field this server does not implement: only the listed "off" values pass."""
    def check(name, value):
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise bad_request(name, f"not supported by this server (only {shown} is accepted), got {quote(value)}")
    return check


_IMPLEMENTED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
                "ignore_eos", "stop_token_ids", "n", "best_of", "return_tokens_as_token_ids",
                "priority", "prompt_logprobs", "echo"} | set(NEUTRAL_PROCESSORS)
_COMPLETION_ONLY: set[str] = set()
_NEUTRAL_COMMON = {
    "min_tokens": _neutral(0, None), "use_beam_search": _neutral(False, None), "length_penalty": _neutral(1, 1.0, None),
    "include_stop_str_in_output": _neutral(False, None), "skip_special_tokens": _neutral(True, None),
    "spaces_between_special_tokens": _neutral(True, None),
    "truncate_prompt_tokens": _neutral(None),
    "allowed_token_ids": _neutral(None), "bad_words": _neutral(None, []),
    "response_format": _neutral(None, {"type": "text"}), "guided_json": _neutral(None), "guided_regex": _neutral(None),
    "guided_choice": _neutral(None), "guided_grammar": _neutral(None), "structured_outputs": _neutral(None),
"add_special_tokens": _neutral(None),
    "service_tier": _neutral(None, "auto", "default"), "store": _neutral(False, None),
    "metadata": _neutral(None),
}
NEUTRAL_ONLY = {
    "completion": {**_NEUTRAL_COMMON, "suffix": _neutral(None, ""), "top_logprobs": _neutral(None, 0)},
    "chat": {**_NEUTRAL_COMMON, "tools": _neutral(None, []), "tool_choice": _neutral(None, "none", "auto"),
             "functions": _neutral(None, []), "function_call": _neutral(None, "none", "auto"),
             "parallel_tool_calls": _neutral(None, True), "add_generation_prompt": _neutral(True, None),
             "continue_final_message": _neutral(False, None),
             "chat_template": _neutral(None),
             "chat_template_kwargs": _neutral(None, {}), "documents": _neutral(None), "modalities": _neutral(None, ["text"]),
             "prediction": _neutral(None), "audio": _neutral(None), "reasoning_effort": _neutral(None),
             "web_search_options": _neutral(None)},
}
_REQUIRED = {"completion": "prompt", "chat": "messages"}


def fields(kind: str) -> set[str]:
    """Every field a ``kind`` request may carry."""
    return _IMPLEMENTED | set(NEUTRAL_ONLY[kind]) | {_REQUIRED[kind]} | (
        {"max_completion_tokens", "top_logprobs"} if kind == "chat" else _COMPLETION_ONLY)


# --- prompts -------------------------------------------------------------------------------------------------

def _prompts(value, tokenizer, max_chars: int | None) -> list[list[int]]:
    """A string, a list of token ids, or a list of strings / token-id lists (a batch)."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(is_int(t) for t in value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, (str, list)) for p in value):
        raise bad_request("prompt", "expected a string, a list of token ids, or a list of those, got "
                                    f"{quote(value)}")
    if len(value) > MAX_CHOICES:
        raise bad_request("prompt", f"{len(value)} prompts; at most {MAX_CHOICES} per request")
    out = []
    for i, p in enumerate(value):
        param = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            check_chars(param, p, max_chars)                  # before tokenising
            out.append(tokenizer.encode(p, bos=tokenizer.add_bos_default))
        else:
            out.append(token_ids(p, tokenizer, param))
    return out


# --- sampling ------------------------------------------------------------------------------------------------

def _stop(data) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise bad_request("stop", f"expected a string or a list of strings, got {quote(stop)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request("stop", f"{len(stop)} strings; at most {MAX_STOP_STRINGS}")
    if any(not isinstance(s, str) for s in stop):
        raise bad_request("stop", f"expected strings, got {quote(stop)}")
    if sum(map(len, stop)) > MAX_STOP_CHARS:
        raise bad_request("stop", f"{sum(map(len, stop))} characters in all; at most {MAX_STOP_CHARS}")
    ids = data.get("stop_token_ids") or []
    if not isinstance(ids, list) or len(ids) > MAX_STOP_STRINGS:
        raise bad_request("stop_token_ids", f"expected a list of at most {MAX_STOP_STRINGS} token ids, got "
                                            f"{quote(ids)}")
    return tuple(stop), tuple(ids)


def _logit_bias(value, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request("logit_bias", f"expected an object {{token id: bias}}, got {quote(value)}")
    out = []
    for k, v in value.items():
        if not k.isdigit() or not int(k) < vocab_size:
            raise bad_request("logit_bias", f"key {quote(k)} is not a token id in [0, {vocab_size})")
        out.append((int(k), v))
    return tuple(out)


def _logprobs(data, kind) -> int | None:
    if kind == "completion":                   # vLLM: an integer k >= 0 asks for the chosen token + k others
        lp = data.get("logprobs")
        if lp is None or lp is False:
            return None
        check_type("logprobs", lp, (int,), "an integer or null")
        return lp
    lp, top = data.get("logprobs"), data.get("top_logprobs")
    if lp is not None:
        check_type("logprobs", lp, (bool,), "a boolean")
    if top is not None and (not is_int(top) or not 0 <= top <= MAX_LOGPROBS):
        raise bad_request("top_logprobs", f"expected an integer in [0, {MAX_LOGPROBS}], got {quote(top)}")
    if top and not lp:
        raise bad_request("top_logprobs", "only allowed when logprobs is true")
    return (top or 0) if lp else None


def _prompt_logprobs(data, stream: bool) -> int | None:
    """vLLM's ``prompt_logprobs``: null, or k in [0, MAX_LOGPROBS] alternatives per prompt token (vLLM's -1, the
    whole vocabulary, is refused as unbounded); not with ``stream`` (as vLLM)."""
    k = data.get("prompt_logprobs")
    if k is None:
        return None
    if not is_int(k) or not 0 <= k <= MAX_LOGPROBS:
        raise bad_request("prompt_logprobs", f"expected an integer in [0, {MAX_LOGPROBS}] or null, got {quote(k)}")
    if stream:
        raise bad_request("prompt_logprobs", "not available when stream is true (as in vLLM)")
    return k


def _sampling(data, kind, prompt_len, max_model_len, default_max_tokens, vocab_size, echo,
              prompt_k: int | None) -> SamplingParams:
    max_tokens = data.get("max_tokens")
    if kind == "chat" and data.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise bad_request("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_tokens = data["max_completion_tokens"]
    if max_tokens is None:                     # the stated default, shortened to what the context has left
        max_tokens = min(default_max_tokens, max_model_len - prompt_len) if prompt_len < max_model_len \
            else default_max_tokens
    stop, stop_ids = _stop(data)
    ignore_eos = data.get("ignore_eos", False)
    check_type("ignore_eos", ignore_eos, (bool,), "a boolean")
    top_p = data.get("top_p")

    def given(name, default):
        return default if data.get(name) is None else data[name]

    try:
        params = SamplingParams(
            temperature=given("temperature", DEFAULT_TEMPERATURE), top_p=1.0 if top_p is None else top_p,
            max_tokens=max_tokens, seed=data.get("seed"), stop=stop, stop_token_ids=stop_ids, ignore_eos=ignore_eos,
            top_k=given("top_k", 0), min_p=given("min_p", 0.0), presence_penalty=given("presence_penalty", 0.0),
            frequency_penalty=given("frequency_penalty", 0.0), repetition_penalty=given("repetition_penalty", 1.0),
            logit_bias=_logit_bias(data.get("logit_bias"), vocab_size), logprobs=(lp := _logprobs(data, kind)),
            prompt_logprobs=max((k for k in (lp if echo else None, prompt_k) if k is not None), default=None))
    except SamplingError as e:
        raise bad_request(e.param, str(e).split(": ", 1)[-1][: 2 * QUOTE_CHARS]) from None
    return params


def _n(data) -> int:
    n = data.get("n")
    n = 1 if n is None else n
    if not is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise bad_request("n", f"expected an integer in [1, {MAX_CHOICES}], got {quote(n)}")
    best_of = data.get("best_of")
    if best_of is not None and best_of != n:
        raise bad_request("best_of", f"not supported by this server (only null or n = {n} is accepted), got "
                                     f"{quote(best_of)}")
    return n


def parse_request(kind: str, data: dict[str, Any], tokenizer, *, model_name: str, max_model_len: int,
                  default_max_tokens: int, max_prompt_chars: int | None = None) -> GenerationRequest:
    """Validate one request body (already a JSON object) of ``kind`` "completion" or "chat" and tokenise its
    prompts (strings longer than ``max_prompt_chars`` are refused before tokenising)."""
    neutral_only = NEUTRAL_ONLY[kind]
    allowed = fields(kind)
    for name in sorted(data):
        if name not in allowed:
            raise bad_request(name[:QUOTE_CHARS], "unknown or unsupported parameter")
        if name in neutral_only:
            neutral_only[name](name, data[name])
    for name in ("model", _REQUIRED[kind]):
        if name not in data:
            raise bad_request(name, "required field is missing")
    check_type("model", data["model"], (str,), "a string")
    if data["model"] != model_name:
        raise APIError(404, f"model: {quote(data['model'])} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if data.get("user") is not None:
        check_type("user", data["user"], (str,), "a string")
    stream = data.get("stream", False)
    if stream is not None:
        check_type("stream", stream, (bool,), "a boolean")
    stream = bool(stream)
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"} \
                or options.get("continuous_usage_stats"):
            raise bad_request("stream_options", f"expected {{\"include_usage\": bool}}, got {quote(options)}")
        include_usage = options.get("include_usage", False)
        check_type("stream_options.include_usage", include_usage, (bool,), "a boolean")
    n = _n(data)
    if kind == "chat":
        prompts = [chat_prompt_ids(data["messages"], tokenizer, max_prompt_chars)]
    else:
        prompts = _prompts(data["prompt"], tokenizer, max_prompt_chars)
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request("n", f"{len(prompts)} prompts x n = {n} choices; at most {MAX_CHOICES} per request")
    echo, as_ids = data.get("echo") or False, data.get("return_tokens_as_token_ids") or False
    check_type("echo", echo, (bool,), "a boolean")
    check_type("return_tokens_as_token_ids", as_ids, (bool,), "a boolean")
    echo_text = chat_echo(data["messages"]) if kind == "chat" and echo else ""
    echo = echo and kind == "completion"
    prompt_k = _prompt_logprobs(data, stream)
    params = _sampling(data, kind, max(map(len, prompts)), max_model_len, default_max_tokens, tokenizer.vocab_size,
                       echo, prompt_k)
    try:
        priority = check_priority(0 if data.get("priority") is None else data["priority"])
    except SamplingError as e:
        raise bad_request(e.param, str(e).split(": ", 1)[-1]) from None
    return GenerationRequest(kind, data["model"], prompts, n, params, stream, include_usage, echo, as_ids,
                             priority, prompt_k, echo_text)
