"""Chat templates rendered the way transformers renders them: a sandboxed jinja2 environment with
``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``, ``tojson`` and ``strftime_now``."""

from __future__ import annotations

import json
from typing import Any


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
