"""The ASGI app: routes, API-key check, body limit, CORS, OpenAI error objects.

    app = create_app(model, ServeConfig(alias="qwq"))   # model: a loaded QwQ, or a path/name
    uvicorn.run(app, host="127.0.0.1", port=8014)

Statuses (OpenAI's and vLLM's): 400 malformed JSON, a bad or missing parameter, or a prompt over
the context (code context_length_exceeded); 401 a missing or wrong key; 404 an unknown route or
model; 413 a body over the limit; 503 with Retry-After while loading or when the queue is full;
500 only for internal faults, logged, answered without internals.
"""


import asyncio
import functools
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import ContextOverflowError, QwQLocalError, TemplateError, UsageError
from . import handlers
from .engine import Engine
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, completion_id, error_body, now

log = logging.getLogger("qwq_local.serve")

# No `from __future__ import annotations` here: FastAPI reads the route parameters' annotations
# (Request, the request models) at definition time, from the function's scope.

__all__ = ["ServeConfig", "check_parallel", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """Server options. alias: the model id clients send and /v1/models lists (default: the file
    name without .gguf); api_key: required as `Authorization: Bearer KEY` on /v1 and /metrics;
    cors: an allowed origin ("*" for any), None keeps CORS off; parallel: slots sharing one
    context (continuous batching; a loaded model must come with QwQ.load(parallel=...) alike);
    queue_size: requests that may wait for a slot; max_body_bytes: larger bodies get 413;
    special_in_content: control-token text in messages becomes control tokens (off: plain
    text, see QwQ.encode_prompt); load: QwQ.load keywords when the app loads the model itself."""

    alias: str | None = None
    api_key: str | None = None
    cors: str | None = None
    parallel: int = 1
    queue_size: int = constants.SERVE_QUEUE_SIZE
    max_body_bytes: int = constants.SERVE_MAX_BODY_BYTES
    special_in_content: bool = False
    load: dict | None = None


class _State:
    def __init__(self) -> None:
        self.model: Any = None
        self.engine: Engine | None = None
        self.metrics: Metrics | None = None
        self.model_id = ""
        self.error: str | None = None


def check_parallel(parallel: int) -> None:
    if not 1 <= parallel <= constants.MAX_PARALLEL:
        raise UsageError(f"--parallel must be between 1 and {constants.MAX_PARALLEL} slots, not {parallel}")


def create_app(model: Any, config: ServeConfig | None = None):
    """A FastAPI app serving `model`: a loaded `QwQ` (the app takes it over and closes it on
    shutdown) or a path/cached name that the app loads at startup (/health says "loading"
    until then). Raises UsageError for bad options."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    check_parallel(config.parallel)
    if config.queue_size < 0:
        raise UsageError(f"queue size must be >= 0, not {config.queue_size}")
    state = _State()

    def start(qwq: Any) -> None:
        state.model = qwq
        state.model_id = config.alias or Path(str(qwq.path)).name.removesuffix(".gguf")
        metrics = Metrics(queue_depth=lambda: state.engine.queue_depth() if state.engine else 0,
                          slots_busy=lambda: state.engine.slots_busy() if state.engine else 0,
                          kv_cells=lambda: state.engine.kv_cells_used() if state.engine else 0)
        state.metrics = metrics
        slots = qwq.sequences()
        if len(slots) != config.parallel:
            raise UsageError(f"the model was loaded with parallel={len(slots)} but the server asks for "
                             f"{config.parallel} slots; load it with QwQ.load(..., parallel={config.parallel})")
        shared = qwq.shared
        if shared is not None:
            shared.on_decode = metrics.on_decode
        state.engine = Engine(slots, queue_size=config.queue_size, on_done=metrics.on_reply, runner=shared)

    def load_in_background() -> None:
        from ..runtime.model import QwQ

        try:
            start(QwQ.load(model, **{"parallel": config.parallel, **(config.load or {})}))
        except Exception as exc:  # /health reports it; the process keeps answering
            log.exception("loading the model failed")
            state.error = str(exc)

    @asynccontextmanager
    async def lifespan(app):
        if isinstance(model, (str, Path)):
            threading.Thread(target=load_in_background, name="qwq-load", daemon=True).start()
        else:
            start(model)
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.close)
        if state.model is not None:
            state.model.close()

    app = FastAPI(title="qwq-local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwq = state

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid')}"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        ctype = request.headers.get("content-type", "")
        if param is None and ctype and "json" not in ctype:  # curl -d without -H sends a form type
            return error_response(APIError(400, f"the body must be JSON sent as Content-Type: application/json, "
                                                f"not {ctype.split(';')[0]} (curl: add -H 'Content-Type: "
                                                "application/json')"))
        what = "missing" if first.get("type") == "missing" else first.get("msg", "invalid")
        return error_response(APIError(400, f"{param or 'body'}: {what}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        message = "no such route: " + request.url.path if exc.status_code == 404 else str(exc.detail)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, message, type=kind, code=None, headers=exc.headers))

    @app.exception_handler(QwQLocalError)
    async def on_library(request: Request, exc: QwQLocalError):
        if isinstance(exc, ContextOverflowError):
            return error_response(APIError(400, str(exc), param="messages", code="context_length_exceeded"))
        if isinstance(exc, (UsageError, TemplateError)):
            return error_response(APIError(400, str(exc)))
        log.error("request failed: %s", exc)
        return error_response(APIError(500, "internal error (see the server log)", type="server_error"))

    @app.exception_handler(Exception)
    async def on_fault(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, "internal error (see the server log)", type="server_error"))

    def ready() -> tuple[Any, Engine]:
        if state.engine is None:
            if state.error:
                raise APIError(500, f"the model failed to load: {state.error}", type="server_error")
            raise APIError(503, "the model is loading; retry shortly", type="server_error", code="loading",
                           headers={"Retry-After": "2"})
        return state.model, state.engine

    def check_model(name: str | None) -> None:
        if name and name not in (state.model_id, Path(str(state.model.path)).name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r} "
                                "(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: health checks such as curl -I
    async def health():
        if state.engine is not None:
            return {"status": "ok"}
        if state.error:
            return JSONResponse({"status": "error", "message": state.error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def metrics():
        ready()
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    def model_object() -> dict:
        qwq, engine = ready()
        return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "qwq-local",
                "context_length": qwq.n_ctx, "meta": {"n_ctx_per_slot": qwq.n_ctx, "slots": len(engine.slots)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):  # the openai client's models.retrieve
        ready()
        check_model(name)
        return model_object()

    async def begin(body: Any, request: Request, prepare, stream, prefix: str, texts: list[str] | None = None):
        """Validate and queue a request (both completion routes); returns (prepared request, id,
        created, reply), the last item an SSE response when the body asks to stream; texts: see
        handlers.collect."""
        qwq, engine = ready()
        check_model(body.model)
        prepared = await asyncio.to_thread(prepare, body, qwq)
        job = handlers.submit(engine, prepared)
        cid, created = completion_id(prefix), now()
        if body.stream:
            extra = {"echo": prepared.echo} if prepared.echo else {}
            events = stream(job, cid=cid, model_id=state.model_id, created=created,
                            include_usage=prepared.include_usage, **extra)
            return prepared, cid, created, EventSourceResponse(_sse(events), ping=constants.SERVE_SSE_PING_S)
        reply = await handlers.collect(job, request.is_disconnected, texts)
        if reply is None:  # cancelled before it started (the client went away)
            raise APIError(499 if await request.is_disconnected() else 503, "request cancelled",
                           type="server_error")
        return prepared, cid, created, reply

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _, cid, created, reply = await begin(body, request, functools.partial(handlers.prepare_chat, special_in_content=config.special_in_content),
                                              handlers.stream_chat, "chatcmpl")
        if body.stream:
            return reply
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "message": handlers.chat_message(reply), "logprobs": None,
                             "finish_reason": handlers.finish_reason(reply)}],
                "usage": handlers.usage_of(reply)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        texts: list[str] = []  # what a stream of this request would send, stop strings cut
        prepared, cid, created, reply = await begin(body, request, handlers.prepare_completion,
                                                    handlers.stream_completion, "cmpl", texts)
        if body.stream:
            return reply
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                "choices": [{"index": 0, "logprobs": None, "text": prepared.echo + "".join(texts),
                             "finish_reason": handlers.finish_reason(reply)}],
                "usage": handlers.usage_of(reply)}

    @app.get("/")
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestCounter, state=state)
    if config.api_key:
        app.add_middleware(APIKey, key=config.api_key)
    if config.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[config.cors], allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


async def _sse(chunks):
    """sse-starlette events: one `data: {json}` per chunk, an error object if the stream
    fails half-way (the status line is already sent), then `data: [DONE]`."""
    try:
        async for body in chunks:
            yield {"data": json.dumps(body, ensure_ascii=False)}
    except APIError as exc:
        yield {"data": json.dumps(error_body(exc))}
    except Exception:
        log.exception("stream failed")
        yield {"data": json.dumps(error_body(APIError(500, "internal error (see the server log)",
                                                      type="server_error")))}
    yield {"data": "[DONE]"}


async def _send_error(scope, receive, send, exc: APIError) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)(scope, receive, send)


class RequestCounter:
    """ASGI middleware: count answered requests by route and status for /metrics. (Starlette's
    BaseHTTPMiddleware would hide the client's disconnect from the endpoints.)"""

    def __init__(self, app, *, state: _State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics = self.state.metrics
            if metrics is not None and status:
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.requests.labels(route, str(status[0])).inc()


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 (by Content-Length, or while
    reading a chunked body) before any handler sees it."""

    def __init__(self, app, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        too_big = APIError(413, f"request body over {self.limit} bytes", param=None, code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(scope, receive, send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(scope, receive, send, too_big)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class APIKey:
    """ASGI middleware: /v1/* and /metrics need `Authorization: Bearer KEY` (compared in
    constant time); the chat page and /health stay open (the page asks for the key)."""

    def __init__(self, app, *, key: str) -> None:
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and (path.startswith("/v1") or path == "/metrics"):
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await _send_error(scope, receive, send, APIError(
                    401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        await self.app(scope, receive, send)
