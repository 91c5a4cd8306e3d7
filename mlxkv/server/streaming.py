"""From the engine's thread to the event loop: a request's tokens as server-sent events or one answer.

The engine calls ``Flight.notify`` from its thread after every event; that sets an asyncio
event on the server's loop, so a waiting stream wakes without polling. Whatever ends a
response (the last token, a client that went away, a shutdown), ``Flight.close`` runs once:
an unfinished request is cancelled at once (the engine frees its row and cache memory at its
next step) and the request is logged and counted.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mlxkv.engine import Request, Token
from mlxkv.server.errors import APIError, shutting_down
from mlxkv.server.responses import DONE, Reply, sse


class Flight:
    """One engine request as the event loop sees it. ``cause``: why it ended early, when it did
    ("disconnected" or "shutdown")."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_close: Callable[["Flight"], None]) -> None:
        self.loop, self.on_close = loop, on_close
        self.wake = asyncio.Event()
        self.request: Request | None = None
        self.cause: str | None = None
        self.closed = False

    def notify(self) -> None:
        """Called by the engine thread after each event."""
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def tokens(self) -> AsyncIterator[Token]:
        """The request's tokens as they come, until it finishes (any reason)."""
        while True:
            try:
                event = self.request.events.get_nowait()
            except queue.Empty:
                await self.wake.wait()
                self.wake.clear()
                continue
            if event is None:
                return
            yield event

    def stop(self, cause: str) -> None:
        """End the request early: the engine drops it at its next step."""
        if self.request is not None and not self.request.done:
            self.cause = self.cause or cause
            self.request.cancel()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop("disconnected")
            self.on_close(self)

    def failure(self) -> APIError | None:
        """Why the request did not end with an answer ("stop" or "length"), as an error; None if it did."""
        reason = self.request.finish_reason
        if reason in ("stop", "length"):
            return None
        if self.cause == "shutdown":
            return shutting_down()
        if reason == "error":
            return APIError(f"generation failed: {self.request.error}", 500, code="generation_failed")
        return APIError(f"the request ended early ({reason})", 500, code=reason)


class EventStream(StreamingResponse):
    """A streaming response that closes its flight however the response ends: finished,
    cancelled by a disconnect (Starlette cancels the body on ``http.disconnect``) or failed."""

    def __init__(self, flight: Flight, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.flight = flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.flight.close()


async def events(flight: Flight, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: the chunks, a last chunk with the finish reason (or an error event when
    the request failed or the server is shutting down), the usage if asked, then ``[DONE]``."""
    if reply.chat:
        yield sse(reply.chunk(first=True))
    async for token in flight.tokens():
        if token.text:
            yield sse(reply.chunk(token.text))
    error = flight.failure()
    if error is None:
        yield sse(reply.chunk(finish_reason=flight.request.finish_reason))
    elif flight.cause != "disconnected":
        yield sse(error.body())
    if include_usage:
        yield sse(reply.usage_chunk(flight.request.usage))
    yield DONE


async def answer(flight: Flight, http_request: HTTPRequest) -> None:
    """Wait for the whole answer; a client that hangs up first cancels it."""
    async def drained() -> None:
        async for _ in flight.tokens():
            pass

    async def hung_up() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.ensure_future(drained()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done_task, gone_task):
            task.cancel()
    if not done_task.done() or done_task.cancelled():
        flight.stop("disconnected")


def whole(flight: Flight, reply: Reply) -> dict[str, Any]:
    error = flight.failure()
    if error is not None:
        raise error
    request = flight.request
    return reply.whole(request.text, request.finish_reason, request.usage)
