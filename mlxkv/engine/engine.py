"""Engine: many generations at once on one model, with continuous batching on mlxkv caches.

Requests wait in a bounded queue; each step admits waiting requests while the batch has
room and the KV budget allows (the planner's bytes for prompt + max_tokens: the caches' own
bookkeeping), prefills a newcomer alone (reusing a cached prefix when one matches), then runs
one decode step for every active sequence in a single forward pass. Sequences join and leave
between steps without recomputing the others. A background thread runs the steps for a
server; notebooks call ``run_until_idle`` or ``generate_batch``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.caches.factory import make_kv_cache
from mlxkv.config import KVConfig
from mlxkv.engine.prefix_cache import PrefixCache
from mlxkv.engine.prompts import encode_chat, messages_for
from mlxkv.engine.requests import Request, RequestError
from mlxkv.engine.rows import Rows, rows_for
from mlxkv.engine.sampling import SamplingParams
from mlxkv.engine.session import Session, Token
from mlxkv.units import format_bytes

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64


@dataclass(frozen=True)
class EngineMetrics:
    active: int
    queued: int
    kv_bytes: int  # what the active sequences' caches hold now
    kv_reserved: int  # what admission counted for them
    kv_budget: int | None
    prefix_cache_bytes: int
    prefix_cache_entries: int
    prefix_hits: int
    prefix_misses: int
    requests: int  # finished, all reasons
    generated_tokens: int
    tokens_per_second: float  # decode, over the last few seconds
    batched: bool


class Engine:
    """``model`` and ``tokenizer`` from ``mlxkv.load``; every sequence uses ``config``.

    ``max_batch``: sequences decoded together; ``kv_budget``: bytes of KV cache the active
    sequences may reserve (None: no limit); ``max_queue``: waiting requests before new ones get
    429; ``prefix_cache_bytes``: finished conversations' caches kept for reuse (0: none).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: KVConfig | None = None, *,
                 max_batch: int = DEFAULT_MAX_BATCH, kv_budget: int | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, prefix_cache_bytes: int = 0,
                 prefill_step_size: int | None = None, context_limit: int | None = None) -> None:
        from mlxkv.memory.layout import layout_from_model

        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.config = config or KVConfig()
        self.max_batch, self.kv_budget, self.max_queue = max_batch, kv_budget, max_queue
        self.prefill_step_size = prefill_step_size
        self.context_limit = context_limit or getattr(getattr(model, "args", None), "max_position_embeddings", None)
        self.layout = layout_from_model(model)
        self.rows: Rows = rows_for(make_kv_cache(model, self.config))
        self.active: list[Request] = []  # in row order
        self.reserved: list[int] = []
        self.waiting: deque[Request] = deque()
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._finished = self._generated = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps

    # -- asking ----------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               notify: Callable[[], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request (token ids). RequestError 400 when it can never be served, 429 when
        the queue is full."""
        request = self.new_request(prompt, params, notify, request_id)
        with self._lock:
            self._check_room(len(self.waiting))
            self.waiting.append(request)
            self._lock.notify()
        return request

    def new_request(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
                    notify: Callable[[], None] | None = None, request_id: str | None = None) -> Request:
        """A checked request, not queued yet: RequestError 400 when it can never be served."""
        if not prompt:
            raise RequestError("the prompt is empty")
        total = len(prompt) + params.max_tokens
        if self.context_limit and total > self.context_limit:
            raise RequestError(
                f"this model's context is {self.context_limit:,} tokens; the request needs {total:,} "
                f"({len(prompt):,} in the prompt, {params.max_tokens:,} to generate): shorten it or lower max_tokens",
                code="context_length_exceeded")
        need = self.reservation(total)
        if self.kv_budget is not None and need > self.kv_budget:
            raise RequestError(
                f"the request's KV cache ({format_bytes(need)} for {total:,} tokens) exceeds the server's KV budget "
                f"of {format_bytes(self.kv_budget)}: shorten it or lower max_tokens", code="kv_budget_exceeded")
        return Request(prompt, params, self.tokenizer, notify, request_id)

    def _check_room(self, waiting: int) -> None:
        if waiting >= self.max_queue:
            raise RequestError(f"the server is busy ({waiting} requests waiting); retry later",
                               status=429, code="queue_full")

    def reservation(self, tokens: int) -> int:
        """KV bytes a sequence of ``tokens`` tokens takes: the planner's count of the caches' own book."""
        from mlxkv.memory.cache_bytes import predict_kv_bytes

        return predict_kv_bytes(self.config, self.layout, tokens, dtype_bytes=self.layout.dtype_bytes or 2)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams()) -> list[Request]:
        """Submit every prompt and run until all are done (no thread): a batch for a notebook."""
        requests = [self.submit(p, params) for p in prompts]
        self.run_until_idle()
        return requests

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Run steps in a background thread until ``stop``."""
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="mlxkv-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Finish nothing more: active and waiting requests end with reason "cancelled"."""
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for request in [*self.active, *self.waiting]:
            request._finish("cancelled")

    def _loop(self) -> None:
        try:
            self._steps()
        finally:  # MLX frees a thread's streams only when asked: else the process aborts at exit
            mx.clear_streams()

    def _steps(self) -> None:
        while True:
            with self._lock:
                while self._running and not (self.waiting or self.active):
                    self._lock.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                for request in [*self.active]:
                    request._finish("error", f"{type(e).__name__}: {e}")
                self.rows.remove(list(range(len(self.active))))
                self.active, self.reserved = [], []

    def run_until_idle(self) -> None:
        while self.waiting or self.active:
            self.step()

    def step(self) -> None:
        """Drop cancelled requests, admit one newcomer if it fits, decode one token for everyone."""
        self._drop_cancelled()
        self._admit()
        if self.active:
            self._decode()

    # -- a step ----------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._lock:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                request._finish("cancelled")
        gone = [i for i, r in enumerate(self.active) if r.cancelled]
        if gone:
            self._leave(gone, "cancelled")

    def _fits(self, need: int, reserved: list[int] | None = None) -> bool:
        """Whether one more sequence reserving ``need`` bytes fits beside ``reserved`` (the active ones)."""
        reserved = self.reserved if reserved is None else reserved
        if self.kv_budget is None:
            return True
        if self.rows.shares_slots:  # a packed batch: every row takes the widest row's slots
            return (len(reserved) + 1) * max([need, *reserved]) <= self.kv_budget
        return sum(reserved) + need <= self.kv_budget

    def admits(self, tokens: int, limit: int = 10_000) -> int:
        """How many sequences of ``tokens`` tokens (prompt + max_tokens) the KV budget admits
        together, by the rule admission applies (the batch size aside; at most ``limit``)."""
        need, reserved = self.reservation(tokens), []
        if self.kv_budget is not None and need > self.kv_budget:
            return 0
        while len(reserved) < limit and self._fits(need, reserved):
            reserved.append(need)
        return len(reserved)

    def _admit(self) -> None:
        with self._lock:
            if not self.waiting or len(self.active) >= self.max_batch:
                return
            request = self.waiting[0]
            need = self.reservation(len(request.prompt) + request.params.max_tokens)
            if self.active and not self._fits(need):
                return  # waits until a sequence leaves
            self.waiting.popleft()
        entry = self.prefixes.take(request.prompt)
        try:
            session = Session(self.model, self.tokenizer, self.config, prefill_step_size=self.prefill_step_size,
                              cache=entry.cache if entry else None, tokens=entry.tokens if entry else ())
            logits = session.prefill(request.prompt)
            token = int(request.sampler(logits - mx.logsumexp(logits, keepdims=True)).item())
        except Exception as e:  # this request fails; the others go on
            request._finish("error", f"{type(e).__name__}: {e}")
            return
        request.usage.cached_tokens = session.stats.reused_tokens
        request.timing.first_token = time.perf_counter()
        if self._emit(request, token):
            self._retire(request, session.cache, session.tokens)
            return
        self.rows.add(session.cache)
        self.active.append(request)
        self.reserved.append(need)

    def _decode(self) -> None:
        start = time.perf_counter()
        logits = self.rows.forward(self.model, [r.generated[-1] for r in self.active])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.stack([r.sampler(logprobs[i]) for i, r in enumerate(self.active)]).tolist()
        self._count(time.perf_counter() - start, len(tokens))
        done = [i for i, (request, token) in enumerate(zip(self.active, tokens)) if self._emit(request, token)]
        if done:
            self._leave(done, None)

    def _emit(self, request: Request, token: int) -> bool:
        """Hand one token to its request; True when the request is finished."""
        request.generated.append(token)
        request.usage.completion_tokens += 1
        self._generated += 1
        if token in self.eos:
            request.detokenizer.finalize()
            request._emit(Token(token, request.stops.feed(request.detokenizer.last_segment) + request.stops.flush(),
                                "stop"))
            request._finish("stop")
            return True
        request.detokenizer.add_token(token)
        text = request.stops.feed(request.detokenizer.last_segment)
        if request.stops.stopped:
            request._emit(Token(token, text, "stop"))
            request._finish("stop")
            return True
        if request.usage.completion_tokens >= request.params.max_tokens:
            request.detokenizer.finalize()
            text += request.stops.feed(request.detokenizer.last_segment) + request.stops.flush()
            request._emit(Token(token, text, "length"))
            request._finish("length")
            return True
        request._emit(Token(token, text))
        return False

    def _leave(self, rows: list[int], reason: str | None) -> None:
        caches = self.rows.remove(rows)
        for row, cache in zip(rows, caches):
            request = self.active[row]
            if reason is not None:
                request._finish(reason)
            # the cache holds the prompt and every generated token but the last (never fed)
            self._retire(request, cache, request.prompt + request.generated[:-1])
        self.active = [r for i, r in enumerate(self.active) if i not in set(rows)]
        self.reserved = [n for i, n in enumerate(self.reserved) if i not in set(rows)]

    def _retire(self, request: Request, cache: list[Any], tokens: list[int]) -> None:
        """A finished (or cancelled) sequence's cache holds ``tokens``: keep it for a next turn
        that starts with them (a shared system prompt survives a client that hung up)."""
        self._finished += 1
        self.prefixes.put(tokens, cache)

    def _count(self, seconds: float, tokens: int) -> None:
        now = time.perf_counter()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()

    # -- watching --------------------------------------------------------------------------------
    def metrics(self) -> EngineMetrics:
        span = self._recent[-1][0] - self._recent[0][0] if len(self._recent) > 1 else 0.0
        rate = sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0
        return EngineMetrics(
            active=len(self.active), queued=len(self.waiting), kv_bytes=self.rows.nbytes,
            kv_reserved=sum(self.reserved), kv_budget=self.kv_budget,
            prefix_cache_bytes=self.prefixes.nbytes, prefix_cache_entries=len(self.prefixes.entries),
            prefix_hits=self.prefixes.hits, prefix_misses=self.prefixes.misses, requests=self._finished,
            generated_tokens=self._generated, tokens_per_second=rate,
            batched=self.rows.shares_slots,
        )


def generate_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
                   config: KVConfig | str | None = None, params: SamplingParams = SamplingParams(),
                   max_batch: int = DEFAULT_MAX_BATCH, chat_template: bool = True) -> list[str]:
    """Answers to several prompts, decoded together on one KV config: the notebook entry point.

    Text prompts go through the tokenizer's chat template (``chat_template=False`` for raw text);
    token-id prompts are used as they are."""
    from mlxkv.caches.factory import resolve_config

    def encode(prompt: str | Sequence[int]) -> list[int]:
        return encode_chat(tokenizer, messages_for(prompt), chat_template) if isinstance(prompt, str) else list(prompt)

    engine = Engine(model, tokenizer, resolve_config(config), max_batch=max_batch, max_queue=len(prompts))
    return [r.text for r in engine.generate([encode(p) for p in prompts], params)]
