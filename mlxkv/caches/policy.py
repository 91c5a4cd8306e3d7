"""Policy: which tokens a cache keeps, in which slot, and which of them a query may see.

A policy maps token positions to store slots and answers visibility by position, so the
same policy works over any storage (dense, affine, ...). Visibility is expressed in
positions rather than slot order; that is what lets a rotating window be quantized.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

Run = tuple[int, int, int]
"""(first slot, first row of the source chunk, length): one contiguous write."""


class KeepAll:
    """Every token stays; the token at position p lives in slot p."""

    bounded = False
    capacity: int | None = None

    def params(self) -> dict[str, Any]:
        return {}

    def placements(self, start: int, n: int) -> list[Run]:
        return [(start, 0, n)] if n > 0 else []

    def slot_positions(self, flushed: int) -> mx.array | None:
        """None: slot i holds position i (the caller reads only the first ``flushed`` slots)."""
        return None

    def visible(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        return k_pos[None, :] <= q_pos[:, None]

    def limits_view(self) -> bool:
        """Whether visibility can hide older tokens from a query (beyond causality)."""
        return False

    def overwrites(self, flushed: int, n: int) -> bool:
        return False

    def can_trim(self, flushed: int) -> bool:
        return True


class SinkWindow:
    """StreamingLLM: the first ``sinks`` tokens plus the most recent ``window`` tokens.

    A query at position q sees key k when ``k <= q`` and (``k < sinks`` or ``q - k < window``).
    The store holds the sinks and a ring of ``window - residual`` slots; the cache keeps the
    newest ``residual`` tokens outside the store, so store + residual cover the window.
    With ``sinks=0`` this is the sliding-window attention of Gemma/Mistral layers.
    """

    bounded = True

    def __init__(self, sinks: int, window: int, residual: int = 0) -> None:
        if window - residual <= 0:
            raise ValueError(f"window {window} must exceed the residual {residual}")
        self.sinks = sinks
        self.window = window
        self.residual = residual
        self.ring = window - residual
        self.capacity = sinks + self.ring

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "window": self.window, "residual": self.residual}

    def slot_of(self, pos: int) -> int:
        return pos if pos < self.sinks else self.sinks + (pos - self.sinks) % self.ring

    def placements(self, start: int, n: int) -> list[Run]:
        end = start + n
        runs: list[Run] = []
        sink_end = min(end, self.sinks)
        if start < sink_end:
            runs.append((start, 0, sink_end - start))
        # Tokens that a later token of the same chunk would overwrite are never written.
        pos = max(start, self.sinks, end - self.ring)
        while pos < end:
            slot = self.slot_of(pos)
            length = min(end - pos, self.capacity - slot)
            runs.append((slot, pos - start, length))
            pos += length
        return runs

    def slot_positions(self, flushed: int) -> mx.array:
        """Position held by each filled slot after ``flushed`` tokens went through the store."""
        sinks = mx.arange(min(flushed, self.sinks))
        filled = min(max(flushed - self.sinks, 0), self.ring)
        r = mx.arange(filled)
        latest = self.sinks + r + self.ring * ((flushed - 1 - self.sinks - r) // self.ring)
        return mx.concatenate([sinks, latest])

    def visible(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        q, k = q_pos[:, None], k_pos[None, :]
        return (k <= q) & ((k < self.sinks) | (q - k < self.window))

    def limits_view(self) -> bool:
        return True

    def overwrites(self, flushed: int, n: int) -> bool:
        """Whether writing ``n`` more tokens replaces tokens already in the ring."""
        return flushed + n > self.capacity

    def can_trim(self, flushed: int) -> bool:
        """Only while nothing was evicted: an evicted token cannot come back."""
        return flushed <= self.capacity


def policy_from_params(params: dict[str, Any]) -> KeepAll | SinkWindow:
    return SinkWindow(**params) if params else KeepAll()
