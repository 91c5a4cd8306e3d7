"""What a request asks of generation besides its prompt: how many tokens, how to sample, when to stop.

One set of rules for the CLI flags (``--temp``, ``--top-p``, ``--max-tokens``, ``--seed``),
the Python API and the server's request fields (``temperature``, ``top_p``, ``max_tokens``,
``stop``, ``seed``), so a bad value gets the same answer everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from mlxkv.errors import UserError

MAX_STOPS = 4
"""Stop strings per request, OpenAI's limit."""


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_p`` 1 keeps the whole distribution; ``seed`` makes a
    sampled answer repeatable; ``stop``: strings that end the answer (not included)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise UserError(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise UserError(f"seed must be a whole number, got {self.seed!r}")
        if len(self.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop takes up to {MAX_STOPS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class StopMatcher:
    """Streams text while holding back what could still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets ``stopped`` when a stop string completes."""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class RowSampler:
    """Sampling for one sequence of a batch: its own temperature, nucleus and random stream, so
    a seeded answer is the same whatever else shares the batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.key = mx.random.key(seed % 2**64)  # OpenAI's seeds are int64; MLX keys take 0..2**64-1

    def __call__(self, logprobs: mx.array) -> mx.array:
        """log-probabilities [vocab] -> a token id (scalar array, lazy)."""
        if self.params.greedy:
            return mx.argmax(logprobs, axis=-1)
        if self.params.top_p < 1:
            from mlx_lm.sample_utils import apply_top_p

            logprobs = apply_top_p(logprobs[None], self.params.top_p)[0]
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.params.temperature), key=key)
