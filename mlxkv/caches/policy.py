"""Policy: which tokens a cache keeps, in which slot, and which of them a query may see.

A policy maps token positions to store slots and answers visibility by position, so the
same policy works over any storage (dense, affine, ...). Visibility is expressed in
positions rather than slot order; that is what lets a rotating window be quantized.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any, Protocol

import mlx.core as mx

if TYPE_CHECKING:
    from mlxkv.caches.book import ChunkPlan

Run = tuple[int, int, int]
"""(first slot, first row of the leaving tokens, length): one contiguous write."""


class Policy(Protocol):
    """Which tokens a cache keeps, in which store slot, and which of them a query may see.

    ``sinks``: first tokens kept in the 16-bit sink tier; ``capacity``: store slots (None:
    unbounded); ``window``: tokens kept besides the sinks (bounded policies); ``scored``: placement
    ranks tokens by the attention they received (H2O), so the cache reports attention weights.
    """

    sinks: int
    capacity: int | None
    window: int
    bounded: bool
    scored: bool

    def params(self) -> dict[str, Any]: ...
    def slot_of(self, pos: int) -> int: ...
    def placements(self, plan: ChunkPlan) -> list[Run]: ...
    def slot_positions(self, flushed: int) -> mx.array | None: ...
    def sees(self, q: mx.array, k: mx.array) -> mx.array: ...
    def visible(self, q_pos: mx.array, k_pos: mx.array) -> mx.array: ...
    def limits_view(self) -> bool: ...
    def overwrites(self, flushed: int, n: int) -> bool: ...
    def can_trim(self, flushed: int) -> bool: ...
    # scored policies only: what attention told them, and their state for saving
    def observe(self, history: mx.array | None, exact: mx.array) -> None: ...
    def trim_recent(self, keep: int) -> None: ...
    def state(self) -> dict[str, mx.array]: ...
    def load_state(self, state: dict[str, mx.array]) -> None: ...


class _Unscored:
    """What a policy that ignores attention does with it: nothing."""

    scored = False

    def observe(self, history: mx.array | None, exact: mx.array) -> None:
        return None

    def trim_recent(self, keep: int) -> None:
        return None

    def state(self) -> dict[str, mx.array]:
        return {}

    def load_state(self, state: dict[str, mx.array]) -> None:
        return None


class KeepAll(_Unscored):
    """Every token stays. The first ``sinks`` tokens live in the cache's 16-bit sink tier
    (attention sinks, kept exact); the token at position p >= sinks lives in slot p - sinks."""

    bounded = False
    capacity: int | None = None
    window = 0

    def __init__(self, sinks: int = 0) -> None:
        self.sinks = sinks

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks} if self.sinks else {}

    def slot_of(self, pos: int) -> int:
        return pos - self.sinks

    def placements(self, plan: ChunkPlan) -> list[Run]:
        """Runs for the tokens that leave the recent tier for the stores (all past the sinks)."""
        n = plan.to_store
        return [(plan.store_start - self.sinks, 0, n)] if n > 0 else []

    def slot_positions(self, flushed: int) -> mx.array | None:
        """None: slot i holds position ``sinks + i`` (the caller reads only the filled slots)."""
        return None

    def sees(self, q: mx.array, k: mx.array) -> mx.array:
        """Whether a query at position q sees the key at k, elementwise (shapes broadcast)."""
        return k <= q

    def visible(self, q_pos: mx.array, k_pos: mx.array) -> mx.array:
        """[L, T]: which keys (positions ``k_pos``) each query (``q_pos``) sees."""
        return self.sees(q_pos[:, None], k_pos[None, :])

    def limits_view(self) -> bool:
        """Whether visibility can hide older tokens from a query (beyond causality)."""
        return False

    def overwrites(self, flushed: int, n: int) -> bool:
        return False

    def can_trim(self, flushed: int) -> bool:
        return True


class SinkWindow(_Unscored):
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

    def placements(self, plan: ChunkPlan) -> list[Run]:
        """Runs for the tokens that leave the recent tier for the ring (all past the sinks)."""
        start, n = plan.store_start, plan.to_store
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

    def sees(self, q: mx.array, k: mx.array) -> mx.array:
        return (k <= q) & ((k < self.sinks) | (q - k < self.window))

    visible = KeepAll.visible

    def limits_view(self) -> bool:
        return True

    def overwrites(self, flushed: int, n: int) -> bool:
        """Whether writing ``n`` more tokens replaces tokens already in the ring."""
        return max(flushed - self.sinks, 0) + n > self.ring

    def can_trim(self, flushed: int) -> bool:
        """Only while nothing was evicted: an evicted token cannot come back."""
        return flushed - self.sinks <= self.ring


class HeavyHitters:
    """H2O: the sinks, the recent tier and the ``capacity`` older tokens that received the
    most attention (heavy hitters); a bounded cache that keeps what attention uses.

    The policy owns every score: ``slot_scores`` for the tokens in the store slots (whose
    positions are ``slot_positions``, -1 empty) and ``recent_scores`` for the recent tier, each
    the attention a token accumulated (summed over batch, heads and queries) since it arrived.
    Tokens leave the recent tier with the scores they gathered there. The sinks (16-bit sink
    tier) and the recent tier never enter the store, so they are never evicted. ``residual``:
    the recent tier's size, for ``window`` (tokens kept besides the sinks).
    """

    bounded = True
    scored = True
    """The cache reports attention weights (``observe``) and flushes only tokens that earlier
    steps scored, before the step attends: every token competes with at least one score."""

    def __init__(self, sinks: int, capacity: int, residual: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"heavy hitters need a capacity > 0, got {capacity}")
        self.sinks = sinks
        self.capacity = capacity
        self.residual = residual
        self.window = capacity + residual
        self.positions = mx.full((capacity,), -1, dtype=mx.int32)
        self.scores = mx.zeros((capacity,), dtype=mx.float32)
        self.recent_scores = mx.zeros((0,), dtype=mx.float32)

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "capacity": self.capacity, "residual": self.residual}

    def _filled(self, flushed: int) -> int:
        """Slots fill in order and nothing is dropped before all are full."""
        return min(max(flushed - self.sinks, 0), self.capacity)

    def slot_of(self, pos: int) -> int:
        return self.positions.tolist().index(pos)

    def placements(self, plan: ChunkPlan) -> list[Run]:
        """Place the tokens leaving the recent tier for the store, with the scores they gathered
        there, and record them: free slots first; then each token evicts the lowest-scored stored
        token (the oldest among equals) if that scored less, else the token is dropped. Only each
        slot's final token is written. The recent tier's scores then move on with the chunk."""
        mx.eval(self.scores, self.recent_scores)  # last step's attention: keeps the lazy graph one step long
        scores = self.recent_scores[plan.to_sinks : plan.to_sinks + plan.to_store]
        runs = self._place(plan.store_start, plan.to_store, scores)
        self.recent_scores = mx.concatenate([self.recent_scores[plan.leaving:], mx.zeros((plan.n,), dtype=mx.float32)])
        return runs

    def _place(self, start: int, n: int, scores: mx.array) -> list[Run]:
        if n == 0:
            return []
        filled = self._filled(start)
        if filled + n <= self.capacity:  # free slots for every token: nothing competes
            # new arrays, never in-place: a saved state may still hold the old ones
            end = filled + n
            self.positions = mx.concatenate(
                [self.positions[:filled], mx.arange(start, start + n, dtype=mx.int32), self.positions[end:]])
            self.scores = mx.concatenate([self.scores[:filled], scores.astype(mx.float32), self.scores[end:]])
            return [(filled, 0, n)]
        if n == 1 and filled == self.capacity:  # a decode step: one token against the lowest slot
            return self._place_one(start, scores[0])
        positions, slot_scores, incoming = self.positions.tolist(), self.scores.tolist(), scores.tolist()
        heap = [(slot_scores[s], positions[s], s) for s in range(filled)]
        heapq.heapify(heap)
        written: dict[int, int] = {}  # slot -> row of the leaving tokens
        for row, score in enumerate(incoming):
            if filled < self.capacity:
                slot, filled = filled, filled + 1
                heapq.heappush(heap, (score, start + row, slot))
            elif heap[0][0] < score:
                slot = heap[0][2]
                heapq.heapreplace(heap, (score, start + row, slot))
            else:
                continue
            positions[slot], slot_scores[slot], written[slot] = start + row, score, row
        self.positions = mx.array(positions, dtype=mx.int32)
        self.scores = mx.array(slot_scores, dtype=mx.float32)
        runs: list[Run] = []
        for slot, row in sorted(written.items()):  # neighbouring slots from neighbouring rows: one write
            if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == row:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((slot, row, 1))
        return runs

    def _place_one(self, position: int, score: mx.array) -> list[Run]:
        """``placements`` for one token when every slot is taken, on the device: the heap's
        choice (lowest score, then oldest position) without moving the slots to Python."""
        lowest = self.scores.min()
        oldest_lowest = mx.argmin(mx.where(self.scores == lowest, self.positions, mx.iinfo(mx.int32).max))
        slot, wins = oldest_lowest.item(), (lowest < score).item()
        if not wins:
            return []
        here = mx.arange(self.capacity) == slot  # new arrays, as above
        self.positions = mx.where(here, position, self.positions).astype(mx.int32)
        self.scores = mx.where(here, score.astype(mx.float32), self.scores)
        return [(slot, 0, 1)]

    def observe(self, history: mx.array | None, exact: mx.array) -> None:
        """Add one step's attention (lazily): ``history`` over the filled slots, ``exact`` over the
        exact segment, whose tail is the recent tier (the sinks are kept whatever they score)."""
        if history is not None:
            self.scores = self.scores + mx.pad(history, (0, self.capacity - history.shape[0]))
        n_recent = self.recent_scores.shape[0]
        self.recent_scores = self.recent_scores + exact[exact.shape[0] - n_recent:]

    def trim_recent(self, keep: int) -> None:
        self.recent_scores = self.recent_scores[:keep]

    def state(self) -> dict[str, mx.array]:
        return {"slot_positions": self.positions, "slot_scores": self.scores, "recent_scores": self.recent_scores}

    def load_state(self, state: dict[str, mx.array]) -> None:
        self.positions, self.scores = state["slot_positions"], state["slot_scores"]
        self.recent_scores = state["recent_scores"]

    def slot_positions(self, flushed: int) -> mx.array:
        return self.positions[: self._filled(flushed)]

    # Causal only: heavy hitters may lie far in the past. Nothing a step's queries need is
    # overwritten: they attend after the flush, evictions included.
    sees = KeepAll.sees
    visible = KeepAll.visible
    limits_view = KeepAll.limits_view
    overwrites = KeepAll.overwrites

    def can_trim(self, flushed: int) -> bool:
        """Only while nothing was evicted or dropped: such a token cannot come back."""
        return flushed - self.sinks <= self.capacity


def policy_from_params(params: dict[str, Any]) -> Policy:
    if "capacity" in params:
        return HeavyHitters(**params)
    return SinkWindow(**params) if "window" in params else KeepAll(**params)
