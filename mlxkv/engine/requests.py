"""Request: one generation asked of an engine, and the stream of tokens it gets back.

The engine thread produces; callers consume by iterating (blocking), or by a ``notify``
callback the engine calls after every event (how the server wakes its event loop).
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mlxkv.engine.sampling import RowSampler, SamplingParams, StopMatcher
from mlxkv.engine.session import Token
from mlxkv.errors import UserError

_ids = itertools.count()


class RequestError(UserError):
    """A request the engine refuses: ``status`` 400 (it can never be served as asked) or 429
    (the queue is full: retry later)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a cached prefix already held


@dataclass
class Timing:
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted


class Request:
    """What a caller holds: the events (Token, then None at the end), the finish reason and usage."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer,
                 notify: Callable[[], None] | None = None, request_id: str | None = None) -> None:
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt, self.params = list(prompt), params
        self.events: queue.Queue[Token | None] = queue.Queue()
        self.notify = notify
        self.usage = Usage(prompt_tokens=len(prompt))
        self.timing = Timing()
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.on_cancel: Callable[[Request], None] | None = None
        self.text = ""
        # generation state, touched by the engine thread only
        self.generated: list[int] = []
        self.sampler = RowSampler(params)
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopMatcher(params.stop)

    def cancel(self) -> None:
        """Stop generating (a client that went away): the engine frees the sequence at its next step."""
        if self.on_cancel is not None:  # engines that step together on several ranks decide it together
            self.on_cancel(self)
        else:
            self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Token]:
        """Tokens as they come (blocking), until the request finishes."""
        while True:
            event = self.events.get()
            if event is None:
                return
            yield event

    def result(self) -> str:
        """The whole answer (blocks until the request finishes)."""
        for _ in self:
            pass
        return self.text

    # -- the engine's side ---------------------------------------------------------------------
    def _emit(self, token: Token) -> None:
        self.text += token.text
        self.events.put(token)
        if self.notify:
            self.notify()

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason, self.error = reason, error
        self.timing.finished = time.perf_counter()
        self.events.put(None)
        if self.notify:
            self.notify()
