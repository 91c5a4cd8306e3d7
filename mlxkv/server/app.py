"""The OpenAI-compatible HTTP app on an ``Engine``: routes, request handling and shutdown.

Starlette (the ASGI toolkit under FastAPI) carries the HTTP; validation is ours
(``protocol``) so every refusal has OpenAI's error shape and the sampling rules stay those
of ``SamplingParams``. The engine runs in its own thread, started and stopped with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mlxkv.engine import Engine, RequestError
from mlxkv.server.errors import APIError, shutting_down
from mlxkv.server.metrics import ServerMetrics, prometheus, request_line
from mlxkv.server.protocol import Defaults, Reader, ServedModel, read_chat, read_completion
from mlxkv.server.responses import Reply
from mlxkv.server.streaming import EventStream, Flight, answer, events, whole

log = logging.getLogger("mlxkv.server")

MAX_BODY_BYTES = 64 * 2**20
"""A request body larger than this is refused (413) before it is parsed."""


class ServerState:
    """What the handlers share: the engine, the tokenizer, the served model, the requests in
    flight (so a shutdown can end them) and the counters."""

    def __init__(self, engine: Engine, served: ServedModel, defaults: Defaults) -> None:
        self.engine, self.served, self.defaults = engine, served, defaults
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics()
        self.flights: set[Flight] = set()
        self.draining = False
        self.started = int(time.time())

    def drain(self) -> None:
        """Refuse new requests and end the ones in flight: their streams close cleanly (an error
        event, then ``[DONE]``) as soon as the engine drops them. Safe from a signal handler."""
        self.draining = True
        for flight in list(self.flights):
            flight.stop("shutdown")

    def closed(self, flight: Flight) -> None:
        self.flights.discard(flight)
        if flight.request is not None:
            self.metrics.record(flight.request)
            log.info(request_line(flight.request, flight.cause))


def create_app(engine: Engine, served: ServedModel, defaults: Defaults = Defaults()) -> Starlette:
    """The app; the engine's thread starts with the app's lifespan and stops with it."""
    state = ServerState(engine, served, defaults)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            state.drain()
            await run_in_threadpool(engine.stop)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _endpoint(read_chat, "chat", "chatcmpl"), methods=["POST"]),
            Route("/v1/completions", _endpoint(read_completion, "completion", "cmpl"), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.mlxkv = state
    return app


def _state(request: HTTPRequest) -> ServerState:
    return request.app.state.mlxkv


# -- generation ------------------------------------------------------------------------------------
def _endpoint(read: Reader, kind: str, prefix: str):
    async def endpoint(http_request: HTTPRequest) -> Response:
        state = _state(http_request)
        if state.draining:
            raise shutting_down()
        body = await _json_body(http_request)
        # tokenizing (a chat template over a long history) runs off the event loop
        generation = await run_in_threadpool(read, body, state.tokenizer, state.served, state.defaults)
        reply = Reply(kind, f"{prefix}-{uuid.uuid4().hex[:24]}", generation.model)
        flight = Flight(asyncio.get_running_loop(), state.closed)
        try:
            flight.request = state.engine.submit(generation.prompt, generation.params, notify=flight.notify,
                                                 request_id=reply.id)
        except RequestError as e:
            raise APIError.from_engine(e, generation.prompt_field) from None
        state.flights.add(flight)
        if generation.stream:
            return EventStream(flight, events(flight, reply, generation.include_usage))
        try:
            await answer(flight, http_request)
            return JSONResponse(whole(flight, reply))
        finally:
            flight.close()

    return endpoint


async def _json_body(request: HTTPRequest) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MB", 413)
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None


# -- the rest --------------------------------------------------------------------------------------
async def models(request: HTTPRequest) -> Response:
    state = _state(request)
    entry = {"id": state.served.name, "object": "model", "created": state.started, "owned_by": "mlxkv"}
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: HTTPRequest) -> Response:
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "shutting down"}, 503)
    return JSONResponse({"status": "ok"})


async def metrics(request: HTTPRequest) -> Response:
    state = _state(request)
    text = prometheus(state.engine.metrics(), state.metrics, state.engine.max_batch)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# -- errors ----------------------------------------------------------------------------------------
async def api_error(request: HTTPRequest, error: APIError) -> Response:
    _state(request).metrics.refused[error.status] += 1
    return JSONResponse(error.body(), error.status)


async def http_error(request: HTTPRequest, error: HTTPException) -> Response:
    """Starlette's own 404 / 405 in OpenAI's shape."""
    message = f"{request.method} {request.url.path}: {error.detail}"
    return await api_error(request, APIError(message, error.status_code))


async def server_error(request: HTTPRequest, error: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path, exc_info=error)
    return await api_error(request, APIError(f"internal error: {type(error).__name__}: {error}", 500))
