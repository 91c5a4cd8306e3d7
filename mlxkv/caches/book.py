"""CacheBook: the integer bookkeeping of one layer's cache, apart from its tensors.

As llama.cpp keeps its cells (positions, which sequence is where) apart from the K/V
tensors, the book knows where every position is, in plain integers, and nothing about
arrays: positions ``< flushed`` have left the 16-bit recent tier (the first ``sinks`` of
them into the 16-bit sink tier, the rest into the stores, placed by the policy), positions
``flushed .. offset`` are the recent tier. ``plan(n)`` says what a chunk of ``n`` tokens does;
the cache applies the plan to its tensors and the memory planner feeds chunk sizes to the
same book to count bytes, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxkv.caches.policy import Policy
from mlxkv.config import Stage

STORE_STEP = 256
"""Tokens a store's buffers grow by (mlx-lm's KVCache.step)."""


def grown_capacity(current: int, needed: int, step: int = STORE_STEP, limit: int | None = None) -> int:
    """Slots a store holds after making room for ``needed``: whole steps, never past ``limit``."""
    if needed <= current:
        return current
    target = -(-needed // step) * step
    return target if limit is None else min(max(target, needed), limit)


@dataclass(frozen=True)
class ChunkPlan:
    """What storing one chunk of ``n`` tokens does."""

    first: int  # position of the chunk's first token
    n: int
    flushed: int  # positions < flushed had left the recent tier before the chunk
    new_flushed: int  # ... and after it
    to_sinks: int  # leaving the recent tier for the sink tier
    to_store: int  # leaving it for the stores, placed by the policy (H2O may drop some)
    read_first: bool  # the writes replace slots this chunk's queries still see: read the history first

    @property
    def end(self) -> int:
        return self.first + self.n

    @property
    def leaving(self) -> int:
        """Tokens that leave the recent tier (front of the recent tier + chunk)."""
        return self.new_flushed - self.flushed

    @property
    def store_start(self) -> int:
        """Position of the first token that goes to the stores."""
        return self.flushed + self.to_sinks


@dataclass(frozen=True)
class Return:
    """Positions ``aligned .. flushed`` go back from the stores to the recent tier: stores written
    a group of tokens at a time resume on a group boundary (a trim, a precision change)."""

    aligned: int
    flushed: int

    @property
    def n(self) -> int:
        return self.flushed - self.aligned


@dataclass(frozen=True)
class TrimPlan:
    n: int  # tokens forgotten
    keep_recent: int  # recent-tier tokens kept
    keep_sinks: int  # sink-tier tokens kept
    back: Return  # then returned to the recent tier


class CacheBook:
    """Offset, flush point, precision stage and store slots of one layer's cache.

    ``policy``: which tokens stay and where; ``residual``: the newest tokens kept 16-bit;
    ``stages``: precision over the context; ``group``: tokens per store write when keys are
    quantized per channel (``per_channel_keys``), else 1.
    """

    def __init__(self, policy: Policy, residual: int, stages: tuple[Stage, ...], group: int = 1,
                 per_channel_keys: bool = False) -> None:
        self.policy = policy
        self.residual = residual
        self.stages = stages
        self.group = group
        self.per_channel_keys = per_channel_keys
        self.offset = 0  # tokens seen; the rope position of the next token
        self.flushed = 0
        self.stage = 0
        self.allocated = 0  # store slots the buffers hold

    # -- derived -----------------------------------------------------------------------------
    @property
    def unit(self) -> int:
        """Tokens the stores take at a time: a group when keys are packed per channel."""
        keys_packed = self.stages[self.stage].key_bits is not None
        return self.group if self.per_channel_keys and keys_packed else 1

    def align(self, flushed: int) -> int:
        """Down to a whole group of the stores (groups count from the first token after the sinks)."""
        sinks = self.policy.sinks
        return flushed if flushed <= sinks else flushed - (flushed - sinks) % self.unit

    @property
    def stored(self) -> int:
        """Store slots in use: slots fill in order, and a bounded policy stops at its capacity."""
        stored = max(self.flushed - self.policy.sinks, 0)
        cap = self.policy.capacity
        return stored if cap is None else min(stored, cap)

    @property
    def sink_tokens(self) -> int:
        return min(self.flushed, self.policy.sinks)

    @property
    def recent_tokens(self) -> int:
        return self.offset - self.flushed

    @property
    def tier_tokens(self) -> int:
        """Tokens in the 16-bit tiers (sinks and recent)."""
        return self.sink_tokens + self.recent_tokens

    @property
    def visible(self) -> int:
        """Tokens attention can see."""
        if self.policy.bounded:
            return min(self.offset, self.policy.sinks + self.policy.window)
        return self.offset

    # -- what happens ------------------------------------------------------------------------
    def next_stage(self) -> Return | None:
        """Before storing more: once the cache holds the next precision stage's tokens, move to
        it; the stores are then re-encoded and a cut group returns to the recent tier."""
        stage = self.stage
        while stage + 1 < len(self.stages) and self.offset >= self.stages[stage + 1].start:
            stage += 1
        if stage == self.stage:
            return None
        self.stage = stage
        back = Return(self.align(self.flushed), self.flushed)
        self.flushed = back.aligned
        return back

    def plan(self, n: int) -> ChunkPlan:
        """Store ``n`` more tokens: the newest ``residual`` stay in the recent tier, older ones
        leave it in whole store groups. A scored policy (H2O) lets only tokens that earlier steps
        scored leave, so every token competes with at least one score."""
        first, end, flushed = self.offset, self.offset + n, self.flushed
        target = max(flushed, end - self.residual)
        if self.policy.scored:
            target = min(target, first)
        new_flushed = self.align(target)
        to_sinks = max(0, min(new_flushed, self.policy.sinks) - flushed)
        to_store = new_flushed - flushed - to_sinks
        plan = ChunkPlan(first, n, flushed, new_flushed, to_sinks, to_store,
                         read_first=n > 1 and self.policy.overwrites(flushed, to_store))
        self.offset, self.flushed = end, new_flushed
        self.allocated = grown_capacity(self.allocated, self.stored, limit=self.policy.capacity)
        return plan

    def trim(self, n: int) -> TrimPlan:
        """Forget the newest ``n`` tokens (mlx-lm's ``trim``): from the recent tier first, then
        the stores, then the sinks."""
        n = min(self.offset, n)
        keep_recent = self.recent_tokens - min(n, self.recent_tokens)
        self.flushed -= n - min(n, self.recent_tokens)
        self.offset -= n
        keep_sinks = min(self.sink_tokens, self.flushed)
        back = Return(self.align(self.flushed), self.flushed)
        self.flushed = back.aligned
        return TrimPlan(n, keep_recent, keep_sinks, back)

    def can_trim(self) -> bool:
        return self.policy.can_trim(self.flushed)

    def fill(self, tokens: int) -> None:
        """The state after ``tokens`` tokens arrive one at a time from empty, in O(stages):
        one chunk per precision stage, the last token alone (as a scored policy needs)."""
        bounds = sorted({0, tokens, *(min(s.start, tokens) for s in self.stages)} | {max(tokens - 1, 0)})
        for start, stop in zip(bounds, bounds[1:]):
            self.next_stage()
            if stop > start:
                self.plan(stop - start)
