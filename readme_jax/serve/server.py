"""The OpenAI-compatible HTTP server: a FastAPI app around one :class:`readme_jax.serve.engine.Engine`.

    app = create_app(engine, tokenizer, model_name="smollm2", max_model_len=2048, default_max_tokens=16)
    serve(app, host="127.0.0.1", port=8000)          # uvicorn; SIGTERM drains, then exits 0

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with
``"stream": true``), ``GET /health`` (200 ready, 503 starting / draining / engine failed), ``GET /metrics``.
With ``api_key`` every ``/v1`` route needs ``Authorization: Bearer <key>``. Engine errors map to HTTP:
QueueFullError 429 (with Retry-After), NotReadyError 503, EngineError or a request that ends in "error" 500,
SamplingError 400 naming the field. A client that disconnects cancels its request (its slot is freed at
the engine's next step). The engine starts (compiles, warms up) on a thread once the app starts, so
``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from readme_jax.errors import APIError, EngineError, NotReadyError, QueueFullError, SamplingError
from readme_jax.serve import protocol
from readme_jax.serve.metrics import EngineMetrics

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
RETRY_AFTER_S = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EngineStream(StreamingResponse):
    """An SSE response that cancels its engine request however the response ends (client gone included)."""

    def __init__(self, content, stream):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._stream.finished:
                self._stream.cancel()


class _CountRequests:
    """ASGI middleware: counts answered requests by route and status (unknown paths as "other")."""

    def __init__(self, app, metrics: EngineMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            self.metrics.on_request(path if path in ROUTES else "other", status)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine, tokenizer, *, model_name: str, max_model_len: int, default_max_tokens: int,
               api_key: str | None = None, metrics: EngineMetrics | None = None) -> FastAPI:
    """The app serving ``engine`` (not yet started: the app starts it on a thread at startup, and shuts
    it down at exit). ``metrics``: the registry the engine reports to (a fresh one if None)."""
    metrics = metrics if metrics is not None else EngineMetrics()
    created = int(time.time())
    state = {"draining": False, "drained": False, "start_error": None}

    def start_engine():
        try:
            engine.start()
        except Exception as e:  # noqa: BLE001 - any start failure is reported by /health
            state["start_error"] = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=start_engine, name="engine-start", daemon=True).start()
        yield
        if not state["drained"]:                  # not already drained by DrainingServer's signal handler
            await asyncio.to_thread(engine.shutdown, drain_timeout=0.0)

    app = FastAPI(title="readme_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.state = engine, state
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def check_auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state["draining"]:
            status = "draining"
        elif state["start_error"] or engine.error or (engine.ready and not engine.healthy):
            status = "failed"
        elif not engine.ready:
            status = "starting"
        else:
            return {"status": "ok"}
        return JSONResponse({"status": status, "error": state["start_error"] or engine.error}, status_code=503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return protocol.models_list(model_name, created, max_model_len)

    async def generate(request: Request, kind: str):
        check_auth(request)
        if state["draining"]:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        data = protocol.parse_json(await request.body())
        req = protocol.parse_request(kind, data, tokenizer, model_name=model_name, max_model_len=max_model_len,
                                     default_max_tokens=default_max_tokens)
        request_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        try:
            stream = engine.submit(req.prompt_ids, req.params, loop=asyncio.get_running_loop(),
                                   request_id=request_id)
        except QueueFullError as e:
            raise APIError(429, f"the request queue is full ({e}); retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotReadyError as e:
            raise APIError(503, f"the engine is not accepting requests ({e})", type="service_unavailable") from None
        except SamplingError as e:
            param = "messages" if kind == "chat" and e.param == "prompt" else e.param
            raise protocol.bad_request(param, str(e).split(": ", 1)[-1]) from None
        except EngineError as e:
            raise APIError(500, f"the engine failed: {e}", type="server_error") from None
        if req.stream:
            return _EngineStream(_events(req, stream, request_id, int(time.time())), stream)
        return await _complete(request, req, stream, request_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


def _final_error(out) -> APIError | None:
    """The error a finished output stands for: the engine failed (500) or shutdown aborted it (503)."""
    if out.finish_reason == "error":
        return APIError(500, f"the engine failed: {out.error or 'unknown error'}", type="server_error")
    if out.finish_reason == "abort":
        return APIError(503, "the request was aborted (the server is shutting down)", type="service_unavailable")
    return None


async def _complete(request: Request, req, stream, request_id: str):
    """Collect a non-streamed request; a client that disconnects first cancels it."""
    async def collect():
        pieces, last = [], None
        async for out in stream:
            pieces.append(out.text)
            last = out
        return "".join(pieces), last

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():                                  # the client went away
            stream.cancel()
            return Response(status_code=499)
        text, last = task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        if not stream.finished:
            stream.cancel()
    error = _final_error(last)
    if error is not None:
        return _error_response(error)
    use = protocol.usage(last.prompt_tokens or stream.prompt_tokens, last.completion_tokens)
    return protocol.response(req.kind, request_id, int(time.time()), req.model, text, last.finish_reason, use)


async def _events(req, stream, request_id: str, created: int):
    """The SSE body: the role chunk (chat), text chunks, finish_reason on the last one, the usage chunk when
    asked, then ``[DONE]``. An engine failure or shutdown abort mid-stream is sent as an error event."""
    def chunk(**kw):
        return protocol.sse(protocol.chunk(req.kind, request_id, created, req.model,
                                           include_usage=req.include_usage, **kw))

    if req.kind == "chat":
        yield chunk(role=True)
    last = None
    async for out in stream:
        last = out
        if not out.finished:
            if out.text:
                yield chunk(text=out.text)
            continue
        error = _final_error(out)
        if error is not None:
            if out.text:
                yield chunk(text=out.text)
            yield protocol.sse(error.body())
        else:
            yield chunk(text=out.text, finish_reason=out.finish_reason)
    if req.include_usage and last is not None and last.finish_reason not in ("error", "abort"):
        use = protocol.usage(last.prompt_tokens or stream.prompt_tokens, last.completion_tokens)
        yield protocol.sse(protocol.chunk(req.kind, request_id, created, req.model, use=use))
    yield protocol.sse("[DONE]")


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM / SIGINT: /health turns 503 and new requests are refused, the engine
    finishes in-flight requests for up to ``drain_timeout`` seconds and aborts the rest (their clients get a
    clean final event), then the server stops; the process exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self._app, self._drain_timeout = app, drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._app.state.state["draining"] = True

        def drain():
            try:
                self._app.state.engine.shutdown(drain_timeout=self._drain_timeout)
                self._app.state.state["drained"] = True
            finally:
                self.should_exit = True

        threading.Thread(target=drain, name="drain", daemon=True).start()


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
          log_level: str = "info") -> None:
    """Run ``app`` until SIGTERM / SIGINT (see :class:`DrainingServer`)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    DrainingServer(config, app, drain_timeout).run()
