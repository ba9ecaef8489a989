"""The OpenAI / vLLM response bodies: completions (one choice per prompt x sample), stream chunks, SSE
framing, the model list and vLLM's tokenizer endpoints.

    response("completion", req_id, created, model, [(0, text, "length")], usage(12, 8))   # -> dict (JSON body)
    sse(chunk("chat", req_id, created, model, index=1, text="hi"))                          # -> bytes
"""

from __future__ import annotations

import json
from typing import Sequence

from readme_jax.errors import APIError


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, index: int, text: str, finish_reason: str | None, *, delta: bool, role: bool = False) -> dict:
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        d = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def response(kind: str, request_id: str, created: int, model: str, choices: Sequence[tuple[int, str, str]],
             use: dict[str, int]) -> dict:
    """The non-streamed body of a completion ("text_completion") or a chat completion; choices =
    (index, text, finish_reason) in index order."""
    obj = "text_completion" if kind == "completion" else "chat.completion"
    return {"id": request_id, "object": obj, "created": created, "model": model,
            "choices": [_choice(kind, i, text, reason, delta=False) for i, text, reason in choices], "usage": use}


def chunk(kind: str, request_id: str, created: int, model: str, text: str = "", finish_reason: str | None = None,
          *, index: int = 0, role: bool = False, use: dict[str, int] | None = None, include_usage: bool = False) -> dict:
    """One streamed chunk of choice ``index``. ``use`` given: the final usage chunk (no choices). With
    ``include_usage`` every other chunk carries ``"usage": null``, as OpenAI's do."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    out = {"id": request_id, "object": obj, "created": created, "model": model,
           "choices": [] if use is not None else [_choice(kind, index, text, finish_reason, delta=True, role=role)]}
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


def final_error(out) -> APIError | None:
    """The error a finished output stands for: the engine failed (500) or shutdown aborted it (503)."""
    if out.finish_reason == "error":
        return APIError(500, f"the engine failed: {out.error or 'unknown error'}", type="server_error")
    if out.finish_reason == "abort":
        return APIError(503, "the request was aborted (the server is shutting down)", type="service_unavailable")
    return None
