"""ComposedCache: a layer's KV tensors, arranged as its CacheBook plans.

Tokens live in two tiers. The newest ``residual`` tokens stay in 16-bit floats; older ones
are flushed into the stores (keys and values each with their own encoding), placed by the
policy. Attention sees the packed history plus the exact recent tokens and the new chunk,
so a prompt chunk attends to itself exactly and only the history is quantized.

Every decision (where each position goes) is the book's, in integers (``mlxkv.caches.book``);
``update_and_fetch`` applies the book's plan to the tensors, then builds the view attention
reads. The cache follows mlx-lm's protocol (``update_and_fetch``, ``state``, ``meta_state``,
``offset``, ``trim``, ``nbytes``, ``make_mask``, ``empty``), so mlx-lm's generate loop and
prompt caching handle it.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx

from mlxkv.attention.view import KVView, Segment
from mlxkv.caches.book import CacheBook, ChunkPlan, Return
from mlxkv.caches.policy import Policy, policy_from_params
from mlxkv.caches.storage import DenseStore, TensorStore, convert_store, make_store, store_from_params
from mlxkv.config import KVConfig


def tier_dtype(dtype: mx.Dtype, quantized: bool) -> mx.Dtype:
    """The 16-bit tiers' dtype: what a Mac holds (float16, or the model's bfloat16) even when a
    CPU computes in float32; a full-precision cache keeps the model's dtype everywhere."""
    if not quantized:
        return dtype
    return dtype if dtype in (mx.float16, mx.bfloat16) else mx.float16


def stage_stores(config: KVConfig, stage: int, capacity: int | None = None) -> tuple[TensorStore, TensorStore]:
    """Empty key and value stores for one precision stage: what the cache fills and what the
    memory planner counts slot bytes with."""
    p = config.precision
    _, key_bits, value_bits = config.stages[stage]
    return (make_store(key_bits, p.group, capacity, per_channel=p.per_channel_keys and key_bits is not None,
                       mode=p.mode),
            make_store(value_bits, p.group, capacity, mode=p.mode))


def tier_bytes(dtype_bytes: int, quantized: bool) -> int:
    """Bytes per element of the 16-bit tiers (``tier_dtype``) for a model computing in ``dtype_bytes``."""
    return 2 if quantized else dtype_bytes


class ComposedCache:
    """One attention layer's cache: key store + value store + policy + 16-bit exact tiers."""

    def __init__(self, config: KVConfig, policy: Policy, residual: int) -> None:
        self.config = config
        self.policy = policy
        self.book = CacheBook(policy, residual, config.stages, config.precision.group, config.per_channel_keys)
        self.recent_keys: mx.array | None = None  # positions [flushed, offset)
        self.recent_values: mx.array | None = None
        self.sink_keys: mx.array | None = None  # positions [0, min(flushed, sinks))
        self.sink_values: mx.array | None = None
        self.tier_dtype = mx.float16  # of the 16-bit tiers; set from the first chunk
        self.dtype = mx.float32  # what keys and values arrive in (the model's compute dtype)
        self.anchor: mx.array | None = None  # see ``keys``
        self.key_store, self.value_store = self._make_stores()

    # -- mlx-lm's pipelined models ----------------------------------------------------------------
    @property
    def keys(self) -> mx.array:
        """An anchor, not the keys: mlx-lm's pipelined models tie each stage's send to the last
        cache with ``cache[-1].keys = mx.depends(cache[-1].keys, h)``, since a prefill evaluates
        only the caches' state. The anchor is part of ``state``, so the send runs with it."""
        return self.anchor if self.anchor is not None else mx.zeros((0,), dtype=mx.float32)

    @keys.setter
    def keys(self, value: mx.array) -> None:
        self.anchor = value

    # -- the book's numbers, read-only ---------------------------------------------------------
    @property
    def offset(self) -> int:
        """Tokens seen; the rope position of the next token."""
        return self.book.offset

    @property
    def flushed(self) -> int:
        return self.book.flushed

    @property
    def residual(self) -> int:
        return self.book.residual

    def _make_stores(self) -> tuple[TensorStore, TensorStore]:
        return stage_stores(self.config, self.book.stage, self.policy.capacity)

    # -- the protocol ---------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KVView, KVView]:
        """Store a chunk ([B, H, n, D], rope applied) and return what attention must see."""
        if self.book.offset == 0:
            self.dtype = keys.dtype
            self.tier_dtype = tier_dtype(keys.dtype, self.config.quantized)
            if self.config.quantized:
                self.config.precision.check_head_dim(keys.shape[-1])
                self.config.precision.check_head_dim(values.shape[-1])
        back = self.book.next_stage()
        if back is not None:
            self._change_precision(back)
        if self.config.rotate:  # spread outlier channels over the group before quantizing
            keys, values = mx.hadamard_transform(keys), mx.hadamard_transform(values)
        view = self._apply(self.book.plan(keys.shape[2]), keys, values)
        return view, view

    def _apply(self, plan: ChunkPlan, keys: mx.array, values: mx.array) -> KVView:
        """Move the plan's tokens: the front of (recent tier + chunk) leaves, to the sinks or
        to the stores as the policy places them; the rest is the new recent tier."""
        # positions [flushed, end): the recent tier, then the chunk, never copied together whole
        keys, values = _Rows(self.recent_keys, keys), _Rows(self.recent_values, values)
        exact = [(self.sink_keys, self.sink_values, 0)] if self.sink_keys is not None else []
        if keys.recent is not None:
            exact.append((keys.recent, values.recent, plan.flushed))
        exact.append((keys.chunk, values.chunk, plan.first))
        # Writing into slots that queries of this chunk still need: read the store first.
        history = self._history(plan.first, plan.n, plan.flushed, plan.flushed, snapshot=True) if plan.read_first else None
        for slot, row, length in self.policy.placements(plan):
            start = plan.to_sinks + row
            for offset, end in keys.splits(start, start + length, self.key_store.token_unit):
                self.key_store.write(slot + offset - start, keys[offset:end])
            for offset, end in values.splits(start, start + length, self.value_store.token_unit):
                self.value_store.write(slot + offset - start, values[offset:end])
        if plan.to_sinks:
            self.sink_keys = _append(self.sink_keys, keys[: plan.to_sinks].astype(self.tier_dtype))
            self.sink_values = _append(self.sink_values, values[: plan.to_sinks].astype(self.tier_dtype))
        if plan.leaving < len(keys):
            self.recent_keys = keys[plan.leaving :].astype(self.tier_dtype)
            self.recent_values = values[plan.leaving :].astype(self.tier_dtype)
        else:
            self.recent_keys = self.recent_values = None
        return self._view(plan, keys, values, exact, history)

    def _view(self, plan: ChunkPlan, keys: _Rows, values: _Rows,
              exact: list[tuple[mx.array, mx.array, int]], history: Segment | None) -> KVView:
        """The segments attention reads. Tokens flushed by this step are still seen exactly,
        except by a scored policy, whose flush came first: the tokens that lost are gone.

        ``keys``/``values``: the recent tier and the chunk, from ``flushed`` on (``_Rows``);
        ``exact``: the sinks, the recent tier and the chunk before this step moved anything,
        each with its first position. A prompt chunk attends to those as separate segments:
        joined, they would be a copy of the chunk's keys and values alive through the layer's
        attention."""
        lossless = not (self.key_store.lossy or self.value_store.lossy)
        if not plan.read_first and lossless and self.recent_keys is None and self.sink_keys is None:
            # Everything is exact in the store already: one segment, mlx's fused attention.
            segments = [self._history(plan.first, plan.n, plan.new_flushed, plan.end)]
        else:
            shown = plan.flushed
            if self.policy.scored:  # the tokens that lost are gone: the tiers as they are now
                shown = plan.new_flushed
                exact = [(self.sink_keys, self.sink_values, 0)] if self.sink_keys is not None else []
                exact.append((keys[plan.leaving :], values[plan.leaving :], shown))
            if not plan.read_first:
                history = self._history(plan.first, plan.n, plan.new_flushed, shown)
            # Joined: H2O's observer takes the exact tokens as one run; a decode step's copy is
            # a few tokens and saves a segment's operations.
            segments = [history, *self._exact(exact, plan.first, join=self.policy.scored or plan.n == 1)]
        observer = self._observe if self.policy.scored else None
        return KVView([s for s in segments if s is not None], rotated=self.config.rotate, observer=observer)

    def _observe(self, weights: list[mx.array]) -> None:
        """Hand a step's attention to the policy (H2O): the history's, and the exact segment's,
        summed over the batch rows (one policy decides for all of them)."""
        *history, exact = weights
        self.policy.observe(history[0].sum(axis=0) if history else None, exact.sum(axis=0))

    def _history(self, q_first: int, n_queries: int, flushed: int, hide_from: int,
                 snapshot: bool = False) -> Segment | None:
        """The stored tokens with positions < hide_from, as seen by queries q_first.. ."""
        if flushed == 0 or self.key_store.parts is None:
            return None
        slot_pos = self.policy.slot_positions(flushed)
        if slot_pos is None:  # KeepAll: slot i holds position sinks + i
            first = self.policy.sinks
            end = min(flushed, hide_from)  # one past the newest stored position
            n_slots = max(end - first, 0)
            if n_slots == 0:
                return None
            if end <= q_first + 1:  # every slot is at or before the first query
                mask = None
            elif end == q_first + n_queries:
                mask = "causal"
            else:
                mask = self.policy.visible(mx.arange(q_first, q_first + n_queries), mx.arange(first, end))
        else:
            n_slots = slot_pos.shape[0]
            if n_slots == 0:
                return None
            q_pos = mx.arange(q_first, q_first + n_queries)
            mask = (slot_pos < hide_from)[None, :] & self.policy.visible(q_pos, slot_pos)
        return Segment(self.key_store.read(n_slots, snapshot), self.value_store.read(n_slots, snapshot),
                       self.key_store, self.value_store, n_slots, mask)

    def _exact(self, runs: list[tuple[mx.array, mx.array, int]], q_first: int, join: bool) -> list[Segment]:
        """Exact segments, one per run of consecutive positions (keys, values, first
        position), or one for all when ``join``; the chunk's queries are the last rows."""
        n_queries = self.offset - q_first
        positions = [mx.arange(first, first + k.shape[2]) for k, _, first in runs]
        if join and len(runs) > 1:
            runs = [(mx.concatenate([k.astype(self.dtype) for k, _, _ in runs], axis=2),
                     mx.concatenate([v.astype(self.dtype) for _, v, _ in runs], axis=2), 0)]
            positions = [mx.concatenate(positions)]
        segments = []
        for index, ((keys, values, _), k_pos) in enumerate(zip(runs, positions)):
            if not self.policy.limits_view():  # earlier runs: every query sees them
                mask = ("causal" if n_queries > 1 else None) if index == len(runs) - 1 else None
            else:
                mask = self.policy.visible(mx.arange(q_first, self.offset), k_pos)
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            segments.append(Segment((keys,), (values,), _EXACT, _EXACT, keys.shape[2], mask))
        return segments

    # -- moving tokens back ---------------------------------------------------------------------
    def _change_precision(self, back: Return) -> None:
        """quantized_kv_start / adaptive steps: re-encode the stores at the new stage's bits;
        stores written a group at a time take whole groups, the rest returns to the 16-bit tier."""
        old_k, old_v = self.key_store, self.value_store
        new_k, new_v = self._make_stores()
        self._return_to_recent(back, old_k, old_v)
        self.key_store, self.value_store = convert_store(old_k, new_k), convert_store(old_v, new_v)

    def _return_to_recent(self, back: Return, key_store: TensorStore, value_store: TensorStore) -> None:
        """Decode positions ``back.aligned .. back.flushed`` from the stores to the recent tier."""
        if back.n == 0:
            return
        slot = self.policy.slot_of(back.aligned)
        unit = max(key_store.token_unit, value_store.token_unit)
        span = -(-(slot + back.n) // unit) * unit

        def decoded(store: TensorStore) -> mx.array:
            return store.decode(store.read_range(slot - slot % unit, span))[..., slot % unit :, :][..., : back.n, :]

        keys, values = decoded(key_store), decoded(value_store)
        if self.recent_keys is not None:
            keys = mx.concatenate([keys, self.recent_keys.astype(keys.dtype)], axis=2)
            values = mx.concatenate([values, self.recent_values.astype(values.dtype)], axis=2)
        self.recent_keys, self.recent_values = keys.astype(self.tier_dtype), values.astype(self.tier_dtype)

    def is_trimmable(self) -> bool:
        return self.book.can_trim()

    def trim(self, n: int) -> int:
        """Forget the last n tokens (speculative decoding, prompt-cache reuse)."""
        plan = self.book.trim(n)
        if plan.n == 0:
            return 0
        keep = plan.keep_recent
        self.recent_keys = self.recent_keys[..., :keep, :] if keep else None
        self.recent_values = self.recent_values[..., :keep, :] if keep else None
        self.policy.trim_recent(keep)
        if self.sink_keys is not None and plan.keep_sinks < self.sink_keys.shape[2]:
            self.sink_keys = self.sink_keys[..., : plan.keep_sinks, :] if plan.keep_sinks else None
            self.sink_values = self.sink_values[..., : plan.keep_sinks, :] if plan.keep_sinks else None
        self._return_to_recent(plan.back, self.key_store, self.value_store)
        return plan.n

    # -- sizes ---------------------------------------------------------------------------------
    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """None: visibility (causality, window, sinks) is decided per segment at attention."""
        return None

    def size(self) -> int:
        """Tokens attention can see."""
        return self.book.visible

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the stores' whole buffers and the 16-bit tiers."""
        return self.key_store.nbytes + self.value_store.nbytes + self.tier_nbytes

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the tokens held: the stores' filled slots (no growth slack) and the tiers."""
        stored = sum(p.nbytes for store in (self.key_store, self.value_store) for p in self._filled_parts(store))
        return stored + self.tier_nbytes

    @property
    def tier_nbytes(self) -> int:
        tiers = (self.recent_keys, self.recent_values, self.sink_keys, self.sink_values)
        return sum(t.nbytes for t in tiers if t is not None)

    def _filled_parts(self, store: TensorStore) -> list[mx.array]:
        slots = min(self.book.stored, store.capacity)
        return list(store.read(slots)) if slots and store.parts is not None else []

    # -- saving ---------------------------------------------------------------------------------
    @property
    def meta_state(self) -> str:
        """Everything that is not an array, as one JSON string."""
        book = self.book
        return json.dumps({
            "config": self.config.to_dict(), "policy": self.policy.params(), "residual": book.residual,
            "offset": book.offset, "flushed": book.flushed, "stage": book.stage,
            "dtype": str(self.dtype).removeprefix("mlx.core."),
            "key_store": [type(self.key_store).__name__, self.key_store.params()],
            "value_store": [type(self.value_store).__name__, self.value_store.params()],
        })

    @property
    def state(self) -> dict[str, Any]:
        """Arrays of the filled slots only (a saved file holds no growth padding)."""
        return {
            "meta": self.meta_state,
            "keys": self._filled_parts(self.key_store),
            "values": self._filled_parts(self.value_store),
            "recent_keys": self.recent_keys, "recent_values": self.recent_values,
            "sink_keys": self.sink_keys, "sink_values": self.sink_values,
            **self.policy.state(),
            **({"pipeline_anchor": self.anchor} if self.anchor is not None else {}),
        }

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        meta = json.loads(state["meta"])
        self.config = KVConfig(**meta["config"])
        self.policy = policy_from_params(meta["policy"])
        p = self.config.precision
        self.book = CacheBook(self.policy, meta["residual"], self.config.stages, p.group, p.per_channel_keys)
        self.book.offset, self.book.flushed, self.book.stage = meta["offset"], meta["flushed"], meta["stage"]
        self.key_store = store_from_params(*meta["key_store"])
        self.value_store = store_from_params(*meta["value_store"])
        self.key_store.parts = tuple(state.get("keys") or ()) or None
        self.value_store.parts = tuple(state.get("values") or ()) or None
        self.book.allocated = self.key_store.capacity
        self.recent_keys = _none_if_empty(state.get("recent_keys"))
        self.recent_values = _none_if_empty(state.get("recent_values"))
        self.sink_keys = _none_if_empty(state.get("sink_keys"))
        self.sink_values = _none_if_empty(state.get("sink_values"))
        tiers = [t for t in (self.recent_keys, self.sink_keys) if t is not None]
        self.tier_dtype = tiers[0].dtype if tiers else mx.float16
        self.dtype = getattr(mx, meta.get("dtype", "float32"))
        self.anchor = None
        self.policy.load_state(state)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ComposedCache":
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.describe()}, offset={self.offset})"


class _Rows:
    """The recent tier followed by the chunk (``[B, H, n, D]`` each), read by token rows
    without joining them: rows from one of the two are a slice of it; rows across the
    boundary, a copy of just those rows. Joined whole, the copy (a chunk's keys or values per
    layer) stayed alive through the step: a 2,048-token step of the default model with a
    history held 189-193 MB of transient with the join, 174-179 MB without (BENCHMARKS.md)."""

    def __init__(self, recent: mx.array | None, chunk: mx.array) -> None:
        self.recent = None if recent is None else recent.astype(chunk.dtype)
        self.chunk = chunk
        self.boundary = 0 if recent is None else recent.shape[2]

    def __len__(self) -> int:
        return self.boundary + self.chunk.shape[2]

    def __getitem__(self, rows: slice) -> mx.array:
        start, end, _ = rows.indices(len(self))
        if start >= self.boundary:
            return self.chunk[..., start - self.boundary : end - self.boundary, :]
        if end <= self.boundary:
            return self.recent[..., start:end, :]
        return mx.concatenate([self.recent[..., start:, :], self.chunk[..., : end - self.boundary, :]], axis=2)

    def splits(self, start: int, end: int, unit: int) -> list[tuple[int, int]]:
        """Rows ``start .. end`` cut where the chunk begins, rounded up to whole ``unit``s from
        ``start`` (a store's groups along tokens), so that only the cut's first piece copies."""
        if not start < self.boundary < end:
            return [(start, end)]
        cut = start + -(-(self.boundary - start) // unit) * unit
        return [(start, cut), (cut, end)] if cut < end else [(start, end)]


def _append(tier: mx.array | None, x: mx.array) -> mx.array:
    return x if tier is None else mx.concatenate([tier, x], axis=2)


def _none_if_empty(x: mx.array | None) -> mx.array | None:
    return None if x is None or x.size == 0 else x


_EXACT = DenseStore()
"""The codec that multiplies with exact tokens (recent tier and the new chunk)."""
