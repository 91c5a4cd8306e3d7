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

    sinks = 0

    def slot_of(self, pos: int) -> int:
        return pos

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
    The sinks are few and every later token attends to them, so the cache keeps them exact
    in its 16-bit tier; the store holds only a ring of the older part of the window (the
    newest ``residual`` tokens are in the 16-bit tier too). Ring slots come in whole groups
    of ``unit`` tokens, counted from the first token after the sinks, so stores written a
    group at a time (per-channel keys) rotate too. ``sinks=0`` is the sliding-window
    attention of Gemma/Mistral layers.
    """

    bounded = True

    def __init__(self, sinks: int, window: int, residual: int = 0, unit: int = 1) -> None:
        if window - residual <= 0:
            raise ValueError(f"window {window} must exceed the residual {residual}")
        self.sinks = sinks
        self.window = window
        self.residual = residual
        self.unit = unit
        self.ring = -(-(window - residual) // unit) * unit
        self.capacity = self.ring

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "window": self.window, "residual": self.residual, "unit": self.unit}

    def slot_of(self, pos: int) -> int:
        return (pos - self.sinks) % self.ring

    def placements(self, start: int, n: int) -> list[Run]:
        """Runs for positions ``start .. start+n`` (all past the sinks)."""
        end = start + n
        runs: list[Run] = []
        # Tokens that a later token of the same chunk would overwrite are never written.
        pos = max(start, end - self.ring)
        while pos < end:
            slot = self.slot_of(pos)
            length = min(end - pos, self.ring - slot)
            runs.append((slot, pos - start, length))
            pos += length
        return runs

    def slot_positions(self, flushed: int) -> mx.array:
        """Position held by each filled ring slot once positions < ``flushed`` left the 16-bit tier."""
        stored = max(flushed - self.sinks, 0)
        r = mx.arange(min(stored, self.ring))
        return self.sinks + r + self.ring * ((stored - 1 - r) // self.ring)

    def visible(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        q, k = q_pos[:, None], k_pos[None, :]
        return (k <= q) & ((k < self.sinks) | (q - k < self.window))

    def limits_view(self) -> bool:
        return True

    def overwrites(self, flushed: int, n: int) -> bool:
        """Whether writing ``n`` more tokens replaces tokens already in the ring."""
        return max(flushed - self.sinks, 0) + n > self.ring

    def can_trim(self, flushed: int) -> bool:
        """Only while nothing was evicted: an evicted token cannot come back."""
        return flushed - self.sinks <= self.ring


def policy_from_params(params: dict[str, Any]) -> KeepAll | SinkWindow:
    return SinkWindow(**params) if params else KeepAll()
