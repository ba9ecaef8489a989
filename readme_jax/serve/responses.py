"""The OpenAI / vLLM response bodies: completions (one choice per prompt x sample), stream chunks, SSE
framing, the model list and vLLM's tokenizer endpoints.

    response("completion", req_id, created, model, [(0, text, "length", None)], usage(12, 8))   # -> dict
    sse(chunk("chat", req_id, created, model, index=1, text="hi"))                          # -> bytes
    fmt = Logprobs(tokenizer, k=2); fmt.completion([(token_id, (logprob, ((id, lp), ...))), ...]) / fmt.chat(...)

Logprobs have OpenAI's shapes: completions ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (each
top_logprobs entry a {token text: logprob} of the k most likely tokens and the chosen one, as vLLM; None for the
first prompt token of an echo), chat ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
A token's text is its own decoding (a piece of a multi-byte character decodes to U+FFFD, as in vLLM); -inf is
sent as -9999.0 (JSON has no infinity).
"""

from __future__ import annotations

import json
from typing import Sequence

from readme_jax.errors import APIError


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, index: int, text: str, finish_reason: str | None, *, delta: bool, role: bool = False,
            logprobs: dict | None = None) -> dict:
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if delta:
        d = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def response(kind: str, request_id: str, created: int, model: str,
             choices: Sequence[tuple[int, str, str, dict | None]], use: dict[str, int]) -> dict:
    """The non-streamed body of a completion ("text_completion") or a chat completion; choices =
    (index, text, finish_reason, logprobs or None) in index order."""
    obj = "text_completion" if kind == "completion" else "chat.completion"
    return {"id": request_id, "object": obj, "created": created, "model": model,
            "choices": [_choice(kind, i, text, reason, delta=False, logprobs=lp) for i, text, reason, lp in choices],
            "usage": use}


def chunk(kind: str, request_id: str, created: int, model: str, text: str = "", finish_reason: str | None = None,
          *, index: int = 0, role: bool = False, use: dict[str, int] | None = None, include_usage: bool = False,
          logprobs: dict | None = None) -> dict:
    """One streamed chunk of choice ``index``. ``use`` given: the final usage chunk (no choices). With
    ``include_usage`` every other chunk carries ``"usage": null``, as OpenAI's do."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    out = {"id": request_id, "object": obj, "created": created, "model": model,
           "choices": [] if use is not None else [_choice(kind, index, text, finish_reason, delta=True, role=role,
                                                          logprobs=logprobs)]}
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


def _finite(lp: float) -> float:
    return max(float(lp), -9999.0)


class Logprobs:
    """Formats a request's token logprobs (``serve/api.RequestOutput.logprobs`` entries: (logprob, ((token id,
    logprob), ...)) or None) with ``k`` alternatives per token; token texts are decoded once each (``as_ids``:
    written "token_id:N", vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, k: int, as_ids: bool = False):
        self.tokenizer, self.k, self.as_ids = tokenizer, int(k), as_ids
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])
        return self._text[token_id]

    def completion(self, entries, offset: int = 0) -> dict:
        """entries: [(token id, entry or None)] -> OpenAI's completion logprobs, text offsets from ``offset``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, e in entries:
            s = self.text(tid)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in list(e[1][:self.k]) + [(tid, e[0])]:      # a text shared by two tokens keeps the larger
                key = self.text(t)
                top[key] = max(top.get(key, -9999.0), _finite(lp))
            out["token_logprobs"].append(_finite(e[0]))
            out["top_logprobs"].append(top)
        return out

    def _chat_entry(self, tid: int, lp: float) -> dict:
        s = self.text(tid)
        return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}

    def chat(self, entries) -> dict:
        """entries: [(token id, entry)] -> OpenAI's chat logprobs ``{"content": [...]}``."""
        return {"content": [self._chat_entry(tid, e[0]) | {"top_logprobs": [self._chat_entry(t, lp)
                                                                             for t, lp in e[1][:self.k]]}
                            for tid, e in entries]}

    def prompt(self, entries) -> list:
        """entries: [(token id, entry or None)] -> vLLM's ``prompt_logprobs``: None for the first token, then per
        token {token id: {"logprob", "rank", "decoded_token"}}, the token itself first, then its k most likely
        alternatives (ranks 1..k; one already listed is not repeated)."""
        def one(tid, lp, rank):
            return {"logprob": _finite(lp), "rank": int(rank), "decoded_token": self.text(tid)}
        out = []
        for tid, e in entries:
            if e is None:
                out.append(None)
                continue
            d = {tid: one(tid, e[0], e[2])}
            for rank, (t, lp) in enumerate(e[1][:self.k], 1):
                d.setdefault(t, one(t, lp, rank))
            out.append(d)
        return out

    def format(self, kind: str, entries, offset: int = 0) -> dict:
        return self.completion(entries, offset) if kind == "completion" else self.chat(entries)
