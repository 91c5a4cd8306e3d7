"""LockstepEngine: one engine per rank under ``mlx.launch``, stepping together.

A sharded model's forward pass is a collective (every rank sums its heads' share), so every
rank must run the same steps on the same requests. Rank 0 (the leader) takes the requests
(the server runs there); before each step it broadcasts what changed since the last one,
the new requests (token ids and sampling, a random seed fixed for the unseeded) and the
cancellations, and every rank queues them identically. All else an engine decides (admission,
prefix reuse, the batch's rows, the sampled tokens) then follows on every rank from the same
inputs, as mlx-lm's server does with its distributed generator. The other ranks (followers)
only ``follow()``: they block in the broadcast until the leader has something to say.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from mlxkv.engine.engine import Engine
from mlxkv.engine.requests import Request
from mlxkv.engine.sampling import SamplingParams


class LockstepEngine(Engine):
    """An Engine whose steps are announced by rank 0 of ``group`` and run by every rank."""

    def __init__(self, *args: Any, group: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.leader = group.rank() == 0
        self.inbox: list[Request] = []  # leader: accepted, to announce at the next step
        self.cancels: list[str] = []  # leader: ids whose clients went away, to announce
        self._by_id: dict[str, Request] = {}

    # -- the leader takes requests ------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               notify: Callable[[], None] | None = None, request_id: str | None = None) -> Request:
        if not self.leader:
            raise RuntimeError("only rank 0 takes requests")
        if params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=int.from_bytes(os.urandom(8), "little") >> 1)
        request = self.new_request(prompt, params, notify, request_id)
        request.on_cancel = self._ask_cancel
        with self._lock:
            self._check_room(len(self.waiting) + len(self.inbox))
            self.inbox.append(request)
            self._lock.notify()
        return request

    def _ask_cancel(self, request: Request) -> None:
        with self._lock:
            self.cancels.append(request.id)
            self._lock.notify()

    # -- stepping together ----------------------------------------------------------------------------
    def _steps(self) -> None:
        """The leader's loop: wait for work, announce, step."""
        while True:
            with self._lock:
                while self._running and not (self.waiting or self.active or self.inbox or self.cancels):
                    self._lock.wait()
                news = {"submit": [_wire(r) for r in self.inbox], "cancel": list(self.cancels),
                        "stop": not self._running}
                mine, self.inbox, self.cancels = self.inbox, [], []
            if not self._apply(self._broadcast(news), mine):
                return
            self.step()

    def follow(self) -> None:
        """A follower's loop (in its main thread): step as the leader announces, until it stops."""
        try:
            while self._apply(self._broadcast(None), []):
                self.step()
        finally:
            mx.clear_streams()

    def _apply(self, news: dict[str, Any], mine: list[Request]) -> bool:
        """Queue the announced requests (the leader's own objects on rank 0) and mark the
        cancelled ones, identically on every rank. False when the leader stops."""
        for i, (request_id, prompt, params) in enumerate(news["submit"]):
            request = mine[i] if self.leader else Request(prompt, SamplingParams(**params), self.tokenizer,
                                                          request_id=request_id)
            self._by_id[request.id] = request
            self.waiting.append(request)
        for request_id in news["cancel"]:
            request = self._by_id.get(request_id)
            if request is not None:
                request.cancelled = True
        for request_id in [i for i, r in self._by_id.items() if r.done]:
            del self._by_id[request_id]
        return not news["stop"]

    def _broadcast(self, news: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's ``news`` on every rank (two all_sums: the length, then the bytes)."""
        data = json.dumps(news).encode() if self.leader else b""
        length = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        n = int(length.item())
        local = mx.array(list(data), dtype=mx.int32) if self.leader else mx.zeros((n,), dtype=mx.int32)
        received = mx.distributed.all_sum(local, group=self.group, stream=mx.cpu)
        return json.loads(bytes(received.tolist()).decode())


def _wire(request: Request) -> list[Any]:
    """What a follower needs to queue the same request."""
    return [request.id, request.prompt, dataclasses.asdict(request.params)]
