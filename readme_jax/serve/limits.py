"""What bounds a hostile client: the body size and read time, the content type, the header-read time, and
the longest prompt worth tokenising.

    data = await read_body(request, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout_s)  # 413 / 408 / 415
    uvicorn.Config(app, http=header_timeout_protocol(10.0), limit_concurrency=256)
    max_prompt_chars(tokenizer, max_model_len)          # a longer string cannot fit: refused before tokenising

uvicorn has no header-read timeout of its own: ``header_timeout_protocol`` is its h11 protocol with one (a
connection that has not finished sending a request's headers within the timeout is closed), so one-byte-a-
second clients and idle half-open connections do not hold a connection slot for ever.
"""

from __future__ import annotations

import asyncio
import dataclasses

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from readme_jax.errors import APIError

#: Room for the JSON around the prompts (fields, stop strings, messages' framing).
BODY_SLACK_BYTES = 64 * 1024
#: Bytes of JSON per prompt token at most: a token id is at most 6 digits + ", " (lm-eval's batches).
BYTES_PER_TOKEN = 12


@dataclasses.dataclass(frozen=True)
class Limits:
    """max_body_bytes: a larger body is answered 413 before it is read; body_timeout_s: the whole body must
    arrive within it (408); header_timeout_s: a request's headers must (else the connection is closed);
    max_connections: uvicorn's limit_concurrency (503 beyond it)."""

    max_body_bytes: int
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    max_connections: int = 512

    @staticmethod
    def for_context(max_model_len: int, max_prompts: int, **kw) -> "Limits":
        """The default body cap: ``max_prompts`` prompts of ``max_model_len`` token ids each, plus slack."""
        return Limits(max_body_bytes=max_prompts * max_model_len * BYTES_PER_TOKEN + BODY_SLACK_BYTES, **kw)


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """An upper bound on the characters of a text that fits ``max_model_len`` tokens: each token stands for at
    most as many characters as the UTF-8 bytes of its longest piece (a byte token decoded alone is U+FFFD, three
    bytes, which only overestimates), so no prompt that fits is refused by it."""
    longest = max(len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size))
    return max_model_len * max(1, longest)


def check_content_type(request) -> None:
    """JSON or no Content-Type at all (curl -d sends form-encoded; browsers' CORS "simple requests" send
    text/plain, so a web page cannot post to a key-less local server): anything else is a 415."""
    ctype = request.headers.get("content-type")
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype[:100]!r}",
                       type="invalid_request_error", code="unsupported_media_type")


async def read_body(request, *, max_bytes: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes`` (by Content-Length,
    before reading it, or while streaming a chunked one) and with 408 when it takes longer than ``timeout``."""
    check_content_type(request)
    too_large = APIError(413, f"the request body exceeds {max_bytes} bytes (the server's limit)",
                         type="invalid_request_error", code="request_too_large", headers={"Connection": "close"})
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise too_large

    async def read() -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > max_bytes:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    ``header_timeout`` seconds of its first byte (or of the connection's start)."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.warning("closing a connection that sent no complete request headers within %.0f s",
                                self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """The h11 protocol class for ``uvicorn.Config(http=...)`` with a header-read timeout of ``seconds``."""
    return type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout": float(seconds)})
