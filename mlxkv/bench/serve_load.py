"""Load on an OpenAI-compatible server: N clients at once, each streaming one chat answer.

Each client is a thread with the official ``openai`` client; they start together (a
barrier) and time their own stream: time to first token, tokens, decode time. A round's
aggregate throughput is every generated token over the round's wall time (first request
sent to last token received), so it counts what a user of the server gets, queueing and
prefill included.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

TOPICS = (
    "a lighthouse keeper", "a clockmaker", "a river in spring", "the first snow", "a lost map", "a night train",
    "an old library", "a mountain village", "a ship in fog", "a desert well", "a robot gardener", "a winter market",
    "a violin maker", "a comet", "a forest fire", "an island school",
)


def messages(client: int, round_: int) -> list[dict[str, str]]:
    """Fixed prompts, different for every client and round (so no server answers from a cached prompt)."""
    topic = TOPICS[client % len(TOPICS)]
    return [{"role": "system", "content": f"Session {round_}-{client}. You are a storyteller."},
            {"role": "user", "content": f"Write a long story about {topic}."}]


@dataclass(frozen=True)
class Stream:
    """One client's request: ``ttft`` from sending to the first content; ``decode_s`` from the
    first content to the last; ``tokens`` generated (the server's usage)."""

    ttft: float
    decode_s: float
    tokens: int
    sent: float
    done: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 and self.tokens > 1 else 0.0


@dataclass(frozen=True)
class Round:
    clients: int
    streams: list[Stream]

    @property
    def wall_s(self) -> float:
        return max(s.done for s in self.streams) - min(s.sent for s in self.streams)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft(self) -> float:
        return statistics.median(s.ttft for s in self.streams)

    @property
    def stream_tps(self) -> float:
        return statistics.median(s.decode_tps for s in self.streams)


def run_round(base_url: str, model: str, clients: int, max_tokens: int, round_: int, timeout: float = 600) -> Round:
    """``clients`` concurrent greedy streaming chats against ``base_url`` (…/v1)."""
    import openai

    barrier = threading.Barrier(clients)
    results: list[Stream | BaseException | None] = [None] * clients

    def one(i: int) -> None:
        # the official client's default retries: mlx_lm.server listens with a backlog of 5, so
        # 16 clients connecting at once can be refused a connection on a loaded machine
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=timeout)
        try:
            barrier.wait(timeout)
            sent = time.perf_counter()
            first = last = None
            usage = None
            pieces = 0
            stream = client.chat.completions.create(
                model=model, messages=messages(i, round_), max_tokens=max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces += 1
            done = time.perf_counter()
            tokens = usage.completion_tokens if usage is not None else pieces
            first = first or done
            results[i] = Stream(first - sent, (last or done) - first, tokens, sent, done)
        except BaseException as e:  # reported by the caller
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 60)
    failed = [r for r in results if not isinstance(r, Stream)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {clients} clients failed: {failed[0]!r}")
    return Round(clients, results)  # type: ignore[arg-type]
