"""Chat messages: a /v1/chat/completions ``messages`` list validated (roles, text parts only) and rendered
through the model's chat template into prompt token ids; vLLM's chat ``echo``.

    ids = chat_prompt_ids([{"role": "user", "content": "Hi"}], tokenizer, max_chars=None)
    chat_echo([{"role": "user", ...}, {"role": "assistant", "content": "Sure,"}])  ->  "Sure,"
"""

from __future__ import annotations

from readme_jax.serve.request_body import QUOTE_CHARS, bad_request, check_chars, quote

ROLES = ("system", "user", "assistant")


def chat_prompt_ids(messages, tokenizer, max_chars: int | None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "expected a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(where, f"expected an object, got {quote(m)}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise bad_request(f"{where}.{extra[0][:QUOTE_CHARS]}", "not supported by this server")
        if m.get("role") not in ROLES:
            raise bad_request(f"{where}.role", f"expected one of {list(ROLES)}, got {quote(m.get('role'))}")
        content = m.get("content")
        if isinstance(content, list):                      # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       and set(p) == {"type", "text"} for p in content):
                raise bad_request(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                      "are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content", f"expected a string, got {quote(content)}")
        clean.append({"role": m["role"], "content": content})
    check_chars("messages", "".join(m["content"] for m in clean), max_chars)
    if not tokenizer.chat_template:
        raise bad_request("messages", "this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    return tokenizer.encode(text)


def chat_echo(messages) -> str:
    """Chat ``echo`` as vLLM answers it: the last message's content when it is the assistant's (the reply
    continues it), else nothing; text parts joined by newlines. ``messages`` already validated."""
    last = messages[-1]
    if last["role"] != "assistant":
        return ""
    content = last.get("content") or ""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)
