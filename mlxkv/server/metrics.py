"""What the server shows a person: ``/metrics`` in Prometheus text format and a line per request.

The gauges come from the engine (``EngineMetrics``: active sequences, queue, KV bytes against
the budget, decode tokens/s, the prefix cache); the counters of finished and refused requests
are the server's, kept on the event loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mlxkv.engine import EngineMetrics, Request

PREFIX = "mlxkv_"


@dataclass
class ServerMetrics:
    """Counters since the server started."""

    finished: Counter = field(default_factory=Counter)  # finish reason -> requests
    refused: Counter = field(default_factory=Counter)  # HTTP status -> requests
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def record(self, request: Request) -> None:
        self.finished[request.finish_reason or "cancelled"] += 1
        self.prompt_tokens += request.usage.prompt_tokens
        self.cached_tokens += request.usage.cached_tokens
        self.completion_tokens += request.usage.completion_tokens
        if request.timing.ttft is not None:
            self.ttft_sum += request.timing.ttft
            self.ttft_count += 1


def prometheus(engine: EngineMetrics, server: ServerMetrics, max_batch: int) -> str:
    """The text exposition format (version 0.0.4): HELP and TYPE lines, then samples."""
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        lines.extend(f"{PREFIX}{name}{labels} {_number(value)}" for labels, value in samples)

    def one(name: str, kind: str, text: str, value: float) -> None:
        metric(name, kind, text, [("", value)])

    one("active_sequences", "gauge", "Sequences being decoded now.", engine.active)
    one("max_batch", "gauge", "Sequences the engine decodes together at most.", max_batch)
    one("queued_requests", "gauge", "Requests waiting for a row or for KV memory.", engine.queued)
    one("kv_bytes_in_use", "gauge", "Bytes the active sequences' KV caches hold now.", engine.kv_bytes)
    one("kv_bytes_reserved", "gauge", "KV bytes admission counted for the active sequences.", engine.kv_reserved)
    if engine.kv_budget is not None:
        one("kv_budget_bytes", "gauge", "KV bytes the active sequences may reserve (--kv-memory).", engine.kv_budget)
    one("decode_tokens_per_second", "gauge", "Tokens decoded per second over the last seconds, all sequences.",
        engine.tokens_per_second)
    one("generated_tokens_total", "counter", "Tokens generated since start.", engine.generated_tokens)
    one("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", server.prompt_tokens)
    one("cached_prompt_tokens_total", "counter", "Prompt tokens a cached prefix already held.", server.cached_tokens)
    one("prefix_cache_bytes", "gauge", "Bytes of finished conversations' caches kept for reuse.",
        engine.prefix_cache_bytes)
    one("prefix_cache_entries", "gauge", "Conversations kept in the prefix cache.", engine.prefix_cache_entries)
    one("prefix_cache_hits_total", "counter", "Requests that reused a cached prefix.", engine.prefix_hits)
    one("prefix_cache_misses_total", "counter", "Requests that found no cached prefix.", engine.prefix_misses)
    metric("requests_total", "counter", "Finished requests by finish reason.",
           [(f'{{finish_reason="{reason}"}}', n) for reason, n in sorted(server.finished.items())])
    metric("refused_requests_total", "counter", "Requests refused with an error, by HTTP status.",
           [(f'{{status="{status}"}}', n) for status, n in sorted(server.refused.items())])
    metric("time_to_first_token_seconds", "summary", "From arrival to the first token, queueing included.",
           [("_sum", server.ttft_sum), ("_count", server.ttft_count)])
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def request_line(request: Request, cause: str | None = None) -> str:
    """One line per request: id, tokens, time to first token, decode speed, how it ended."""
    usage, timing = request.usage, request.timing
    cached = f" ({usage.cached_tokens} cached)" if usage.cached_tokens else ""
    ttft = f"{timing.ttft:.2f} s" if timing.ttft is not None else "-"
    decode = "-"
    if timing.first_token is not None and timing.finished and usage.completion_tokens > 1:
        span = timing.finished - timing.first_token
        decode = f"{(usage.completion_tokens - 1) / span:.1f} tokens/s" if span > 0 else "-"
    reason = request.finish_reason or "cancelled"
    if cause:
        reason += f" ({cause})"
    return (f"{request.id}: prompt {usage.prompt_tokens} tokens{cached}, completion {usage.completion_tokens}, "
            f"ttft {ttft}, {decode}, finish {reason}")
