"""The OpenAI-compatible HTTP server: a FastAPI app around one :class:`readme_jax.serve.engine.Engine`.

    app = create_app(engine, tokenizer, model_name="smollm2", max_model_len=2048, default_max_tokens=16)
    serve(app, host="127.0.0.1", port=8000)          # uvicorn; SIGTERM drains, then exits 0

Routes: ``GET /v1/models``, ``POST /v1/completions`` (one prompt or a list, ``n`` samples each),
``POST /v1/chat/completions`` (SSE with ``"stream": true``), vLLM's ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, ``GET /health`` (200 ready, 503 starting / draining / failed), ``GET /metrics``. With
``api_key`` all but /health and /metrics need ``Authorization: Bearer <key>``. Every ``/v1`` route answers 503
with Retry-After until the engine (started, compiled and warmed up on a thread) can serve, so a client polling
``/v1/models`` never sees 200 before a completion can succeed. Engine errors map to HTTP: QueueFullError 429
(Retry-After), NotReadyError 503, EngineError or an output ending in "error" 500, SamplingError 400 naming the
field. A client that disconnects cancels its requests. Bodies are bounded (``serve/limits.py``: 413 before
reading more, 415, 408) and parsed and tokenised on a worker thread, so no request stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from readme_jax.errors import APIError, EngineError, NotReadyError, QueueFullError, SamplingError
from readme_jax.serve import protocol, request_body, responses, tokenizer_api
from readme_jax.serve.choices import cancel as _cancel, complete, error_response as _error_response, events
from readme_jax.serve.limits import Limits, header_timeout_protocol, max_prompt_chars, read_body
from readme_jax.serve.metrics import EngineMetrics

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics")
RETRY_AFTER_S = 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("uvicorn.error")


class _EngineStream(StreamingResponse):
    """An SSE response that cancels its engine requests however the response ends (client gone included)."""

    def __init__(self, content, streams):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._streams = streams

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self._streams)


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


def create_app(engine, tokenizer, *, model_name: str, max_model_len: int, default_max_tokens: int,
               api_key: str | None = None, metrics: EngineMetrics | None = None, limits: Limits | None = None) -> FastAPI:
    """The app serving ``engine`` (not yet started: the app starts it on a thread at startup, and shuts
    it down at exit). ``metrics``: the registry the engine reports to (a fresh one if None); ``limits``: body
    size and read time (default: ``Limits.for_context(max_model_len, protocol.MAX_CHOICES)``)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key: empty; give a non-empty key or none")
    metrics = metrics if metrics is not None else EngineMetrics()
    metrics.bind_model_name(model_name)
    limits = limits or Limits.for_context(max_model_len, protocol.MAX_CHOICES)
    prompt_chars = max_prompt_chars(tokenizer, max_model_len)
    created = int(time.time())
    state = {"draining": False, "drained": False, "start_error": None}

    def start_engine():
        t0 = time.perf_counter()
        log.info("engine: compiling and warming up; /v1 routes answer 503 until it is ready")
        try:
            engine.start()
            log.info("engine: ready after %.1f s, serving %r", time.perf_counter() - t0, model_name)
        except Exception as e:  # noqa: BLE001 - any start failure is reported by /health
            state["start_error"] = f"{type(e).__name__}: {e}"
            log.error("engine: failed to start: %s", state["start_error"])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=start_engine, name="engine-start", daemon=True).start()
        yield
        if not state["drained"]:                  # not already drained by DrainingServer's signal handler
            await asyncio.to_thread(engine.shutdown, drain_timeout=0.0)

    app = FastAPI(title="readme_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.state, app.state.limits = engine, state, limits
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, f"{request.method} {request.url.path[:100]}: {e.detail}",
                                        type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {str(e)[:200]}",
                                        type="server_error"))

    def check_auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def check_serving(request: Request):
        """Auth, then 503 (with Retry-After while starting) unless the engine can take a request now."""
        check_auth(request)
        if state["draining"]:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if state["start_error"] or engine.error:
            raise APIError(503, f"the engine failed: {(state['start_error'] or engine.error)[:200]}",
                           type="service_unavailable")
        if not engine.ready:
            raise APIError(503, "the engine is starting (compiling and warming up); retry later",
                           type="service_unavailable", code="starting", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def body_json(request: Request) -> dict:
        body = await read_body(request, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout_s)
        return await asyncio.to_thread(request_body.parse_json, body)

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
        metrics.set_engine_stats(engine.stats())
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_serving(request)
        return responses.models_list(model_name, created, max_model_len)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_auth(request)
        return tokenizer_api.tokenizer_info(tokenizer, max_model_len)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_auth(request)
        data = await body_json(request)
        ids = await asyncio.to_thread(tokenizer_api.parse_tokenize, data, tokenizer, model_name=model_name,
                                      max_prompt_chars=prompt_chars)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                "token_strs": [tokenizer.id_to_token(i) for i in ids] if data.get("return_token_strs") else None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_auth(request)
        data = await body_json(request)
        ids = tokenizer_api.parse_detokenize(data, tokenizer, model_name=model_name)
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

    async def generate(request: Request, kind: str):
        arrival = time.perf_counter()
        check_serving(request)
        data = await body_json(request)
        req = await asyncio.to_thread(protocol.parse_request, kind, data, tokenizer, model_name=model_name,
                                      max_model_len=max_model_len, default_max_tokens=default_max_tokens,
                                      max_prompt_chars=prompt_chars)
        request_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        streams = []
        try:                                       # all choices or none: a refused one cancels the others
            for i in range(len(req.prompts) * req.n):           # samples j > 0 share sample 0's prompt pages
                j = i % req.n
                streams.append(engine.submit(req.prompts[i // req.n], req.choice_params(i),
                                             loop=asyncio.get_running_loop(), request_id=f"{request_id}-{i}",
                                             follows=f"{request_id}-{i - j}" if j else None,
                                             priority=req.priority))
        except QueueFullError as e:
            _cancel(streams)
            raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotReadyError as e:
            _cancel(streams)
            raise APIError(503, f"the engine is not accepting requests ({e})", type="service_unavailable") from None
        except SamplingError as e:
            _cancel(streams)
            param = "messages" if kind == "chat" and e.param == "prompt" else e.param
            raise request_body.bad_request(param, str(e).split(": ", 1)[-1]) from None
        except EngineError as e:
            _cancel(streams)
            raise APIError(500, f"the engine failed: {e}", type="server_error") from None
        done = lambda: metrics.on_request_done(time.perf_counter() - arrival)  # noqa: E731
        if req.stream:
            return _EngineStream(events(req, streams, request_id, int(time.time()), done, tokenizer), streams)
        return await complete(request, req, streams, request_id, int(time.time()), done, tokenizer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


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


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   **kw) -> uvicorn.Config:
    """uvicorn's config for ``app`` with its limits: the header-read timeout (our h11 protocol) and the
    connection cap (``limit_concurrency``: 503 beyond it)."""
    limits: Limits = app.state.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          http=header_timeout_protocol(limits.header_timeout_s),
                          limit_concurrency=limits.max_connections, **kw)


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
          log_level: str = "info") -> None:
    """Run ``app`` until SIGTERM / SIGINT (see :class:`DrainingServer`)."""
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, app, drain_timeout).run()
