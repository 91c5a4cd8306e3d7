"""BatchCache: one layer's caches for several sequences that decode together.

Each row keeps its own book (``CacheBook``: plain integers, as llama.cpp keeps cells per
sequence) and so the very flushes, placements and exact tiers it would have alone: row
``b``'s slot ``j`` holds the token its single cache would hold in slot ``j``. Only the
tensors are shared, stacked along the batch axis:

- the stores ``[B, H, S, ...]`` (S: the largest row's slots; shorter rows are masked),
- the sink tier ``[B, H, sinks, D]``,
- the recent tier as a ring ``[B, H, R, D]``: position ``p`` of a row lives at ``p % R``, so a
  decode step writes one column per row instead of shifting the tier.

A step takes one token per row (``[B, H, 1, D]``); prompts are prefilled alone in a
``ComposedCache`` and joined with ``merge``/``extend``, rows leave with ``filter`` or
``extract`` (back to a single cache, e.g. for a prefix cache). Attention reads the stores
as packed, for the whole batch at once, with a per-row mask. Configs whose precision changes
with the context (adaptive, quantized_kv_start) cannot share one encoding across rows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import mlx.core as mx

from mlxkv.attention.view import KVView, Segment
from mlxkv.caches.book import CacheBook, ChunkPlan
from mlxkv.caches.cache import _EXACT, ComposedCache, stage_stores
from mlxkv.errors import UserError


def batchable(config) -> str | None:
    """Why caches of ``config`` cannot share a batch, or None when they can."""
    if config.backend != "mlxkv":
        return "mlx-lm's caches decode one sequence at a time here; use an mlxkv config"
    if len(config.stages) > 1:
        return "precision that changes with the context (adaptive, quantized_kv_start) differs between rows"
    return None


class BatchCache:
    """B rows of one layer; see the module docstring."""

    def __init__(self, template: ComposedCache, books: list[CacheBook], heads: int, key_dim: int,
                 value_dim: int, dtype: mx.Dtype) -> None:
        self.config = template.config
        self.books = books
        self.dtype = dtype
        self.tier_dtype = template.tier_dtype
        self.unit = max(template.key_store.token_unit, template.value_store.token_unit, 1)
        self.ring = template.residual + self.unit  # holds every recent token a row can have
        self.n_sinks = template.policy.sinks
        self.key_store, self.value_store = stage_stores(self.config, 0, template.policy.capacity)
        B = len(books)
        self.key_store.parts = _empty_parts(self.key_store, B, heads, key_dim, dtype)
        self.value_store.parts = _empty_parts(self.value_store, B, heads, value_dim, dtype)
        self.ring_keys = mx.zeros((B, heads, self.ring, key_dim), dtype=self.tier_dtype)
        self.ring_values = mx.zeros((B, heads, self.ring, value_dim), dtype=self.tier_dtype)
        self.sink_keys = mx.zeros((B, heads, self.n_sinks, key_dim), dtype=self.tier_dtype)
        self.sink_values = mx.zeros((B, heads, self.n_sinks, value_dim), dtype=self.tier_dtype)

    # -- joining and leaving ----------------------------------------------------------------------
    @classmethod
    def merge(cls, caches: Sequence[ComposedCache]) -> "BatchCache":
        """Stack single caches (each after its own prefill) into one batch."""
        first = caches[0]
        why = batchable(first.config)
        if why:
            raise UserError(f"cannot batch KV cache '{first.config.describe()}': {why}")
        for c in caches:
            if c.config != first.config or c.policy.params() != first.policy.params():
                raise ValueError("only caches with the same config and policy can share a batch")
            if c.offset == 0:
                raise ValueError("prefill a sequence before it joins a batch")
        heads, key_dim, value_dim = _row_shape(first)
        batch = cls(first, [_copy_book(c) for c in caches], heads, key_dim, value_dim, first.dtype)
        batch._fill_rows(caches)
        return batch

    def _fill_rows(self, caches: Sequence[ComposedCache]) -> None:
        capacity = max([book.allocated for book in self.books] + [0])
        for store, name in ((self.key_store, "key_store"), (self.value_store, "value_store")):
            rows = []
            for c in caches:
                own = getattr(c, name)
                parts = own.parts if own.parts is not None else _empty_parts(store, 1, *self._shape(store))
                rows.append(store.with_capacity(parts, capacity))
            store.parts = tuple(mx.concatenate(list(column), axis=0) for column in zip(*rows))
        rk, rv, sk, sv = [], [], [], []
        for c, book in zip(caches, self.books):
            index = [p % self.ring for p in range(book.flushed, book.offset)]
            rk.append(_ring_row(self.ring_keys[:1], c.recent_keys, index))
            rv.append(_ring_row(self.ring_values[:1], c.recent_values, index))
            sk.append(_padded(self.sink_keys[:1], c.sink_keys))
            sv.append(_padded(self.sink_values[:1], c.sink_values))
        self.ring_keys, self.ring_values = mx.concatenate(rk), mx.concatenate(rv)
        self.sink_keys, self.sink_values = mx.concatenate(sk), mx.concatenate(sv)

    def _shape(self, store) -> tuple[int, int, mx.Dtype]:
        tier = self.ring_keys if store is self.key_store else self.ring_values
        return tier.shape[1], tier.shape[-1], self.dtype

    def extend(self, other: "BatchCache") -> None:
        """Append ``other``'s rows (continuous batching: sequences join between steps)."""
        capacity = max(self.key_store.capacity, other.key_store.capacity)
        for mine, theirs in ((self.key_store, other.key_store), (self.value_store, other.value_store)):
            a, b = mine.with_capacity(mine.parts, capacity), theirs.with_capacity(theirs.parts, capacity)
            mine.parts = tuple(mx.concatenate([x, y]) for x, y in zip(a, b))
        self.ring_keys = mx.concatenate([self.ring_keys, other.ring_keys])
        self.ring_values = mx.concatenate([self.ring_values, other.ring_values])
        self.sink_keys = mx.concatenate([self.sink_keys, other.sink_keys])
        self.sink_values = mx.concatenate([self.sink_values, other.sink_values])
        self.books = self.books + other.books

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (sequences that finished leave between steps)."""
        index = mx.array(list(keep), dtype=mx.int32)
        for store in (self.key_store, self.value_store):
            store.parts = tuple(p[index] for p in store.parts)
        self.ring_keys, self.ring_values = self.ring_keys[index], self.ring_values[index]
        self.sink_keys, self.sink_values = self.sink_keys[index], self.sink_values[index]
        self.books = [self.books[i] for i in keep]

    def extract(self, row: int) -> ComposedCache:
        """Row ``row`` as a single cache again, exactly as if it had never been batched."""
        book = _copy_book_of(self.books[row])
        cache = ComposedCache.__new__(ComposedCache)
        cache.config, cache.policy, cache.book = self.config, book.policy, book
        cache.tier_dtype, cache.dtype, cache.anchor = self.tier_dtype, self.dtype, None
        cache.key_store, cache.value_store = stage_stores(self.config, 0, book.policy.capacity)
        rows = slice(row, row + 1)
        for store, mine in ((cache.key_store, self.key_store), (cache.value_store, self.value_store)):
            store.parts = mine.with_capacity(tuple(p[rows] for p in mine.parts), book.allocated) \
                if book.allocated else None
        index = mx.array([p % self.ring for p in range(book.flushed, book.offset)], dtype=mx.int32)
        recent = book.offset > book.flushed
        cache.recent_keys = self.ring_keys[rows][:, :, index] if recent else None
        cache.recent_values = self.ring_values[rows][:, :, index] if recent else None
        n_sinks = book.sink_tokens
        cache.sink_keys = self.sink_keys[rows][:, :, :n_sinks] if n_sinks else None
        cache.sink_values = self.sink_values[rows][:, :, :n_sinks] if n_sinks else None
        return cache

    # -- mlx-lm's protocol ------------------------------------------------------------------------
    @property
    def offset(self) -> mx.array:
        """Each row's next position (RoPE takes per-row offsets)."""
        return mx.array([book.offset for book in self.books], dtype=mx.int32)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return None

    def empty(self) -> bool:
        return not self.books

    @property
    def nbytes(self) -> int:
        arrays = [*(self.key_store.parts or ()), *(self.value_store.parts or ()),
                  self.ring_keys, self.ring_values, self.sink_keys, self.sink_values]
        return sum(a.nbytes for a in arrays)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KVView, KVView]:
        """One decode step for every row: ``keys``/``values`` are [B, H, 1, D]."""
        if keys.shape[2] != 1 or keys.shape[0] != len(self.books):
            raise ValueError("a batch step takes one token per row")
        if self.config.rotate:
            keys, values = mx.hadamard_transform(keys), mx.hadamard_transform(values)
        plans = [book.plan(1) for book in self.books]
        self._grow()
        exact_keys = mx.concatenate([self.ring_keys.astype(keys.dtype), keys], axis=2)  # [B, H, R + 1, D]
        exact_values = mx.concatenate([self.ring_values.astype(values.dtype), values], axis=2)
        runs = [book.policy.placements(plan) for book, plan in zip(self.books, plans)]
        sink_count = [plan.flushed if plan.flushed < self.n_sinks else self.n_sinks for plan in plans]
        self._write_sinks(plans, exact_keys, exact_values)
        self._write_stores(plans, runs, exact_keys, exact_values)
        view = self._view(plans, exact_keys, exact_values, sink_count)
        slots = mx.array([plan.first % self.ring for plan in plans], dtype=mx.int32)
        everyone = mx.ones((len(plans),), dtype=mx.bool_)
        self.ring_keys = _put_column(self.ring_keys, slots, keys.astype(self.tier_dtype), everyone)
        self.ring_values = _put_column(self.ring_values, slots, values.astype(self.tier_dtype), everyone)
        return view, view

    # -- a step ------------------------------------------------------------------------------------
    def _column(self, plan: ChunkPlan, position: int) -> int:
        """Where position ``position`` of a row is in the step's exact columns (ring, then the new token)."""
        return self.ring if position == plan.first else position % self.ring

    def _grow(self) -> None:
        needed = max(book.allocated for book in self.books)
        if needed > self.key_store.capacity:
            for store in (self.key_store, self.value_store):
                store.parts = store.with_capacity(store.parts, needed)

    def _write_sinks(self, plans: list[ChunkPlan], keys: mx.array, values: mx.array) -> None:
        for b, plan in enumerate(plans):
            for i in range(plan.to_sinks):
                column = self._column(plan, plan.flushed + i)
                self.sink_keys[b, :, plan.flushed + i] = keys[b, :, column].astype(self.tier_dtype)
                self.sink_values[b, :, plan.flushed + i] = values[b, :, column].astype(self.tier_dtype)

    def _write_stores(self, plans: list[ChunkPlan], runs: list, keys: mx.array, values: mx.array) -> None:
        """Leaving tokens into the stores: one gathered write for the usual step (at most one
        token per row, stores written a token at a time), else row by row."""
        single = self.unit == 1 and all(sum(r[2] for r in row) <= 1 for row in runs)
        if single:
            writes = [(r[0][0], self._column(p, p.store_start + r[0][1])) if r else (0, 0) for p, r in zip(plans, runs)]
            if any(runs):
                slots = mx.array([s for s, _ in writes], dtype=mx.int32)
                where = mx.array([bool(r) for r in runs])
                columns = mx.array([c for _, c in writes], dtype=mx.int32)[:, None, None, None]
                for store, x in ((self.key_store, keys), (self.value_store, values)):
                    token = mx.take_along_axis(x, mx.broadcast_to(columns, (x.shape[0], x.shape[1], 1, x.shape[3])), 2)
                    store.write_tokens(slots, token, where)
            return
        for b, (plan, row_runs) in enumerate(zip(plans, runs)):
            for slot, row, length in row_runs:
                columns = mx.array([self._column(plan, plan.store_start + row + i) for i in range(length)])
                self.key_store.write(slot, keys[b : b + 1, :, columns], rows=slice(b, b + 1))
                self.value_store.write(slot, values[b : b + 1, :, columns], rows=slice(b, b + 1))

    def _view(self, plans: list[ChunkPlan], keys: mx.array, values: mx.array, sinks_before: list[int]) -> KVView:
        """History (the stores, after this step's writes) and exact (sinks, ring, new token), each
        with a [B, 1, T] mask that is what row b's single cache would show its query."""
        scored = self.books[0].policy.scored
        shown = [plan.new_flushed if scored else plan.flushed for plan in plans]
        n_sinks = [min(plan.new_flushed, self.n_sinks) for plan in plans] if scored else sinks_before
        segments = []
        S = self.key_store.capacity
        first = mx.array([plan.first for plan in plans])[:, None]
        shown_at = mx.array(shown)[:, None]
        policy = self.books[0].policy
        if S:
            segments.append(Segment(self.key_store.parts, self.value_store.parts, self.key_store, self.value_store,
                                    S, self._history_mask(plans, first, shown, S)[:, None, :]))
        ring_pos = first - 1 - (first - 1 - mx.arange(self.ring)[None]) % self.ring  # column i holds p = i (mod R)
        recent = (ring_pos >= shown_at) & (ring_pos >= 0)
        if policy.limits_view():
            recent = recent & policy.sees(first, ring_pos)
        sinks = mx.arange(self.n_sinks)[None] < mx.array(n_sinks)[:, None]
        exact_mask = mx.concatenate([sinks, recent, mx.ones((len(plans), 1), dtype=mx.bool_)], axis=1)
        exact_keys = mx.concatenate([self.sink_keys.astype(keys.dtype), keys], axis=2)
        exact_values = mx.concatenate([self.sink_values.astype(values.dtype), values], axis=2)
        segments.append(Segment((exact_keys,), (exact_values,), _EXACT, _EXACT, exact_keys.shape[2],
                                exact_mask[:, None, :]))
        observer = self._observer(plans) if scored else None
        return KVView(segments, rotated=self.config.rotate, observer=observer)

    def _history_mask(self, plans: list[ChunkPlan], first: mx.array, shown: list[int], S: int) -> mx.array:
        """[B, S]: which store slots each row's query sees (what its single cache would show)."""
        policy = self.books[0].policy
        if policy.slot_positions(plans[0].new_flushed) is None:  # keep-all: slot j holds position sinks + j
            filled = [max(min(plan.new_flushed, s) - policy.sinks, 0) for plan, s in zip(plans, shown)]
            return mx.arange(S)[None] < mx.array(filled)[:, None]
        rows = []
        for book, plan in zip(self.books, plans):
            positions = book.policy.slot_positions(plan.new_flushed)
            rows.append(mx.pad(positions, (0, S - positions.shape[0]), constant_values=-1))
        positions = mx.stack(rows)
        return (positions >= 0) & (positions < mx.array(shown)[:, None]) & policy.sees(first, positions)

    def _observer(self, plans: list[ChunkPlan]):
        """H2O: each row's policy gets its own attention (per row, not summed over the batch)."""
        def observe(weights: list[mx.array]) -> None:
            *history, exact = weights
            for b, (book, plan) in enumerate(zip(self.books, plans)):
                n_slots = book.policy.slot_positions(plan.new_flushed).shape[0]
                slots = history[0][b, :n_slots] if history else None
                order = [self.n_sinks + self._column(plan, p) for p in range(plan.new_flushed, plan.end)]
                book.policy.observe(slots, exact[b][mx.array(order, dtype=mx.int32)] if order else exact[b, :0])
        return observe


def _row_shape(cache: ComposedCache) -> tuple[int, int, int]:
    """(kv heads, key dim, value dim) from whatever a prefilled single cache holds."""
    for keys, values in ((cache.recent_keys, cache.recent_values), (cache.sink_keys, cache.sink_values)):
        if keys is not None:
            return keys.shape[1], keys.shape[-1], values.shape[-1]
    unit = max(cache.key_store.token_unit, cache.value_store.token_unit)
    keys = cache.key_store.decode(cache.key_store.read_range(0, unit))
    values = cache.value_store.decode(cache.value_store.read_range(0, unit))
    return keys.shape[1], keys.shape[-1], values.shape[-1]


def _copy_book(cache: ComposedCache) -> CacheBook:
    return _copy_book_of(cache.book)


def _copy_book_of(book: CacheBook) -> CacheBook:
    """A book of its own (and its policy's own state), so a row never shares bookkeeping."""
    new = copy.copy(book)
    new.policy = copy.copy(book.policy)
    return new


def _empty_parts(store, batch: int, heads: int, dim: int, dtype: mx.Dtype) -> tuple:
    """A store's parts with room for no token, shaped for ``batch`` rows."""
    unit = max(store.token_unit, 1)
    return store.with_capacity(store.encode(mx.zeros((batch, heads, unit, dim), dtype=dtype)), 0)


def _ring_row(like: mx.array, recent: mx.array | None, index: list[int]) -> mx.array:
    row = mx.zeros(like.shape, dtype=like.dtype)
    if recent is None or not index:
        return row
    columns = mx.broadcast_to(mx.array(index, dtype=mx.int32)[None, None, :, None], recent.shape)
    return mx.put_along_axis(row, columns, recent.astype(like.dtype), axis=2)


def _padded(like: mx.array, tier: mx.array | None) -> mx.array:
    row = mx.zeros(like.shape, dtype=like.dtype)
    if tier is None:
        return row
    return mx.concatenate([tier.astype(like.dtype), row[:, :, tier.shape[2]:]], axis=2)


def _put_column(tier: mx.array, columns: mx.array, x: mx.array, where: mx.array) -> mx.array:
    index = mx.broadcast_to(columns[:, None, None, None], x.shape)
    old = mx.take_along_axis(tier, index, axis=2)
    return mx.put_along_axis(tier, index, mx.where(where[:, None, None, None], x, old), axis=2)


def merge_caches(caches: Sequence[Sequence[ComposedCache]]) -> list[BatchCache]:
    """Per-sequence cache lists (one cache per layer each) -> one BatchCache per layer."""
    return [BatchCache.merge(list(layer)) for layer in zip(*caches)]
