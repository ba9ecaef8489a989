"""A request body's JSON and the checks every route applies to its values, with the one error shape: a 400
naming the field and quoting at most ``QUOTE_CHARS`` characters of the offending value.

    data = parse_json(body)                          # 400: not JSON, not an object, nested too deep, bad Unicode
    check_type("stream", data.get("stream"), (bool,), "a boolean")
    ids = token_ids(data["prompt"], tokenizer, "prompt")                  # 400: not ids, or outside the vocabulary
"""

from __future__ import annotations

import json
import numbers
from typing import Any

from readme_jax.errors import APIError

QUOTE_CHARS = 100
MAX_JSON_DEPTH = 64


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def quote(value: Any) -> str:
    """``value`` as JSON, cut to QUOTE_CHARS characters (error messages never echo a whole value)."""
    text = value if isinstance(value, str) and len(value) > 4 * QUOTE_CHARS else None
    text = json.dumps(text[: 4 * QUOTE_CHARS] if text is not None else value, ensure_ascii=False, default=str)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + f"... ({len(text)} characters)"


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object of valid Unicode nested at most MAX_JSON_DEPTH deep, else a 400."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise bad_request(None, f"the request body is nested too deep (at most {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(None, f"the request body is not valid JSON ({str(e)[:QUOTE_CHARS]})") from None
    if not isinstance(data, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(data).__name__}")
    stack = [(data, 1, "")]
    while stack:                                        # iterative: depth and Unicode of every value
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(where.lstrip(".") or None, f"nested too deep (at most {MAX_JSON_DEPTH} levels)")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            path = f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]"
            for s in (k, v):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise bad_request(path.lstrip("."), f"not valid Unicode (a lone surrogate at character "
                                                            f"{e.start})") from None
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1, path))
    return data


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_type(name, value, kinds, what):
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise bad_request(name, f"expected {what}, got {quote(value)}")


def check_chars(param: str, text: str, max_chars: int | None) -> None:
    if max_chars is not None and len(text) > max_chars:
        raise bad_request(param, f"{len(text)} characters cannot fit the context ({max_chars} characters at most)")


def token_ids(value: list, tokenizer, param: str) -> list[int]:
    if not value or not all(is_int(t) for t in value):
        raise bad_request(param, f"expected a non-empty list of token ids, got {quote(value)}")
    bad = next((t for t in value if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return [int(t) for t in value]
