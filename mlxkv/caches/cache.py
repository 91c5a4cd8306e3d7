"""mlxkv caches: a storage and a policy composed behind mlx-lm's cache protocol.

Tokens live in two tiers. The newest ``residual`` tokens stay in 16-bit floats; older ones
are flushed into the stores (keys and values each with their own encoding), placed by the
policy. Attention sees the packed history plus the exact recent tokens and the new chunk,
so a prompt chunk attends to itself exactly and only the history is quantized.

``QuantizedCache`` keeps every token; ``SinkWindowCache`` keeps the sinks plus a window;
``HeavyHitterCache`` keeps the sinks, the recent tier and the tokens attention used most.
All are full precision when their config has no bits. They follow mlx-lm's protocol
(``update_and_fetch``, ``state``, ``meta_state``, ``offset``, ``trim``, ``nbytes``,
``make_mask``, ``empty``), so mlx-lm's generate loop and prompt caching handle them.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx

from mlxkv.attention.view import KVView, Segment
from mlxkv.caches.policy import HeavyHitters, KeepAll, Policy, SinkWindow, policy_from_params
from mlxkv.caches.storage import DenseStore, TensorStore, convert_store, make_store, store_from_params
from mlxkv.config import KVConfig


def _recent_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """16-bit for the residual tier: what a Mac holds, even when a CPU computes in float32."""
    return dtype if dtype in (mx.float16, mx.bfloat16) else mx.float16


class ComposedCache:
    """One attention layer's cache: key store + value store + policy + 16-bit exact tiers.

    Positions ``< flushed`` have left the 16-bit recent tier: a window's sinks into the
    16-bit sink tier, everything else into the stores. Positions ``flushed .. offset`` are
    the recent tier.
    """

    def __init__(self, config: KVConfig, policy: Policy, residual: int) -> None:
        self.config = config
        self.policy = policy
        self.residual = residual  # newest tokens kept in 16-bit (0 for full-precision configs)
        self.offset = 0  # tokens seen; also the rope position of the next token
        self.flushed = 0
        self.recent_keys: mx.array | None = None  # positions [flushed, offset)
        self.recent_values: mx.array | None = None
        self.sink_keys: mx.array | None = None  # positions [0, min(flushed, sinks))
        self.sink_values: mx.array | None = None
        # attention each recent-tier token received so far (scored policies only)
        self.recent_scores: mx.array | None = mx.zeros((0,), dtype=mx.float32) if policy.scored else None
        self.tier_dtype = mx.float16  # of the 16-bit tiers; bfloat16 for bfloat16 models
        self.stage = 0  # index into config.stages
        self.key_store, self.value_store = self._make_stores()

    # -- construction -------------------------------------------------------------
    def _make_stores(self) -> tuple[TensorStore, TensorStore]:
        cfg, cap = self.config, self.policy.capacity
        _, key_bits, value_bits = cfg.stages[self.stage]
        return (
            make_store(key_bits, cfg.precision.group, cap, per_channel=cfg.per_channel_keys and key_bits is not None, mode=cfg.mode),
            make_store(value_bits, cfg.precision.group, cap, mode=cfg.mode),
        )

    @staticmethod
    def _flush_unit(*stores: TensorStore) -> int:
        return max(store.token_unit for store in stores)

    def _align(self, flushed: int, unit: int) -> int:
        """Round down to a group boundary of the store (groups count from the first non-sink)."""
        sinks = self.policy.sinks
        return flushed if flushed <= sinks else flushed - (flushed - sinks) % unit

    def _maybe_change_precision(self) -> None:
        """quantized_kv_start / adaptive steps: once the cache holds a step's tokens,
        re-encode the stores in place at that step's bits."""
        steps = self.config.stages
        stage = self.stage
        while stage + 1 < len(steps) and self.offset >= steps[stage + 1].start:
            stage += 1
        if stage == self.stage:
            return
        self.stage = stage
        old_k, old_v = self.key_store, self.value_store
        new_k, new_v = self._make_stores()
        # Stores written a group at a time take whole groups: the rest returns to the 16-bit tier.
        self._return_to_recent(self._align(self.flushed, self._flush_unit(new_k, new_v)), old_k, old_v)
        self.key_store = convert_store(old_k, new_k)
        self.value_store = convert_store(old_v, new_v)

    def _return_to_recent(self, aligned: int, key_store: TensorStore, value_store: TensorStore) -> None:
        """Move positions ``aligned .. flushed`` from the stores back to the 16-bit recent tier."""
        n = self.flushed - aligned
        if n == 0:
            return
        slot = self.policy.slot_of(aligned)
        unit = self._flush_unit(key_store, value_store)
        span = -(-(slot + n) // unit) * unit
        keys = key_store.decode(key_store.read_range(slot - slot % unit, span))[..., slot % unit :, :][..., :n, :]
        values = value_store.decode(value_store.read_range(slot - slot % unit, span))[..., slot % unit :, :][..., :n, :]
        if self.recent_keys is not None:
            keys = mx.concatenate([keys, self.recent_keys.astype(keys.dtype)], axis=2)
            values = mx.concatenate([values, self.recent_values.astype(values.dtype)], axis=2)
        self.recent_keys, self.recent_values = keys.astype(self.tier_dtype), values.astype(self.tier_dtype)
        self.flushed = aligned

    # -- the protocol ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KVView, KVView]:
        """Store a chunk ([B, H, n, D], rope applied) and return what attention must see."""
        if self.offset == 0:
            # full-precision caches keep the model's dtype everywhere
            self.tier_dtype = _recent_dtype(keys.dtype) if self.config.quantized else keys.dtype
            if self.config.quantized:
                self.config.precision.check_head_dim(keys.shape[-1])
                self.config.precision.check_head_dim(values.shape[-1])
        self._maybe_change_precision()
        if self.config.rotate:  # spread outlier channels over the group before quantizing
            keys, values = mx.hadamard_transform(keys), mx.hadamard_transform(values)
        n = keys.shape[2]
        first, end = self.offset, self.offset + n
        flushed = self.flushed
        scored = self.policy.scored
        if scored:  # last step's attention: summing it now keeps the lazy graph one step long
            mx.eval(self.policy.scores, self.recent_scores)
        if self.recent_keys is not None:  # positions [flushed, end)
            new_keys = mx.concatenate([self.recent_keys.astype(keys.dtype), keys], axis=2)
            new_values = mx.concatenate([self.recent_values.astype(values.dtype), values], axis=2)
        else:
            new_keys, new_values = keys, values
        sink_keys, sink_values = self.sink_keys, self.sink_values

        unit = self._flush_unit(self.key_store, self.value_store)
        target = max(flushed, end - self.residual)
        if scored:  # only tokens earlier steps scored may compete for a slot
            target = min(target, first)
        new_flushed = self._align(target, unit)
        to_sinks = max(0, min(new_flushed, self.policy.sinks) - flushed)
        to_store = new_flushed - flushed - to_sinks
        # Writing into slots that queries of this chunk still need: read the store first.
        read_first = n > 1 and self.policy.overwrites(flushed, to_store)
        if read_first:
            history = self._history_segment(first, n, flushed, hide_from=flushed, snapshot=True)

        scores = self.recent_scores[to_sinks : to_sinks + to_store] if scored else None
        for slot, row, length in self.policy.placements(flushed + to_sinks, to_store, scores):
            rows = slice(to_sinks + row, to_sinks + row + length)
            self.key_store.write(slot, new_keys[..., rows, :])
            self.value_store.write(slot, new_values[..., rows, :])

        if to_sinks:
            self.sink_keys = _append(self.sink_keys, new_keys[..., :to_sinks, :].astype(self.tier_dtype))
            self.sink_values = _append(self.sink_values, new_values[..., :to_sinks, :].astype(self.tier_dtype))
        kept = new_flushed - flushed
        if kept < new_keys.shape[2]:
            self.recent_keys = new_keys[..., kept:, :].astype(self.tier_dtype)
            self.recent_values = new_values[..., kept:, :].astype(self.tier_dtype)
        else:
            self.recent_keys = self.recent_values = None
        if scored:
            self.recent_scores = mx.concatenate([self.recent_scores[kept:], mx.zeros((n,), dtype=mx.float32)])
        self.flushed, self.offset = new_flushed, end
        shown = flushed  # where the exact segment starts: tokens flushed by this step are still seen exactly
        if scored:  # the flush came first: the tokens that lost the competition are gone
            shown, sink_keys, sink_values = new_flushed, self.sink_keys, self.sink_values
            new_keys, new_values = new_keys[..., kept:, :], new_values[..., kept:, :]

        lossless = not (self.key_store.lossy or self.value_store.lossy)
        if not read_first and lossless and self.recent_keys is None and self.sink_keys is None:
            # Everything is exact in the store already: one segment, mlx's fused attention.
            segments = [self._history_segment(first, n, new_flushed, hide_from=end)]
        else:
            if not read_first:
                history = self._history_segment(first, n, new_flushed, hide_from=shown)
            exact = self._exact_segment(sink_keys, sink_values, new_keys, new_values, shown, first)
            segments = [history, exact]
        view = KVView(
            [s for s in segments if s is not None], rotated=self.config.rotate,
            observer=self._observe if scored else None,
        )
        return view, view

    def _observe(self, weights: list[mx.array]) -> None:
        """Accumulate a step's attention (H2O): the history's onto its slots, the exact
        segment's tail onto the recent tier (the sinks are kept whatever they score)."""
        *history, exact = weights
        if history:
            self.policy.observe(history[0])
        n_recent = self.recent_scores.shape[0]
        self.recent_scores = self.recent_scores + exact[exact.shape[0] - n_recent :]

    def _history_segment(
        self, q_first: int, n_queries: int, flushed: int, hide_from: int, snapshot: bool = False
    ) -> Segment | None:
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
        return Segment(
            self.key_store.read(n_slots, snapshot), self.value_store.read(n_slots, snapshot),
            self.key_store, self.value_store, n_slots, mask,
        )

    def _exact_segment(
        self, sink_keys: mx.array | None, sink_values: mx.array | None,
        keys: mx.array, values: mx.array, start: int, q_first: int,
    ) -> Segment:
        """Sinks, recent tokens and the new chunk, exact; the chunk's queries are its last rows."""
        n_queries = self.offset - q_first
        if sink_keys is not None:
            k_pos = mx.concatenate([mx.arange(sink_keys.shape[2]), mx.arange(start, start + keys.shape[2])])
            keys = mx.concatenate([sink_keys.astype(keys.dtype), keys], axis=2)
            values = mx.concatenate([sink_values.astype(values.dtype), values], axis=2)
        else:
            k_pos = None
        if not self.policy.limits_view():
            mask = None if n_queries == 1 else "causal"
        else:
            if k_pos is None:
                k_pos = mx.arange(start, start + keys.shape[2])
            mask = self.policy.visible(mx.arange(q_first, self.offset), k_pos)
        return Segment((keys,), (values,), _EXACT, _EXACT, keys.shape[2], mask)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """None: visibility (causality, window, sinks) is decided per segment at attention."""
        return None

    def size(self) -> int:
        """Tokens attention can see."""
        if self.policy.bounded:
            return min(self.offset, self.policy.sinks + self.policy.window)
        return self.offset

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
        """The packed parts of the store's filled slots: positions flushed past the sinks
        (at most the store's room, for a ring)."""
        slots = min(max(self.flushed - self.policy.sinks, 0), store.capacity)
        return list(store.read(slots)) if slots and store.parts is not None else []

    def is_trimmable(self) -> bool:
        return self.policy.can_trim(self.flushed)

    def trim(self, n: int) -> int:
        """Forget the last n tokens (speculative decoding, prompt-cache reuse)."""
        n = min(self.offset, n)
        if n == 0:
            return 0
        n_recent = 0 if self.recent_keys is None else self.recent_keys.shape[2]
        keep_recent = n_recent - min(n, n_recent)
        if keep_recent > 0:
            self.recent_keys = self.recent_keys[..., :keep_recent, :]
            self.recent_values = self.recent_values[..., :keep_recent, :]
        else:
            self.recent_keys = self.recent_values = None
        if self.recent_scores is not None:
            self.recent_scores = self.recent_scores[:keep_recent]
        self.flushed -= n - min(n, n_recent)
        self.offset -= n
        if self.sink_keys is not None and self.flushed < self.sink_keys.shape[2]:
            self.sink_keys = self.sink_keys[..., : self.flushed, :] if self.flushed else None
            self.sink_values = self.sink_values[..., : self.flushed, :] if self.flushed else None
        # A store written a group at a time resumes on a group boundary: the cut group
        # returns to the 16-bit tier (decoded).
        unit = self._flush_unit(self.key_store, self.value_store)
        self._return_to_recent(self._align(self.flushed, unit), self.key_store, self.value_store)
        return n

    # -- saving ---------------------------------------------------------------------
    @property
    def meta_state(self) -> str:
        """Everything that is not an array, as one JSON string."""
        return json.dumps(
            {
                "config": self.config.to_dict(),
                "policy": self.policy.params(),
                "residual": self.residual,
                "offset": self.offset,
                "flushed": self.flushed,
                "stage": self.stage,
                "key_store": [type(self.key_store).__name__, self.key_store.params()],
                "value_store": [type(self.value_store).__name__, self.value_store.params()],
            }
        )

    @property
    def state(self) -> dict[str, Any]:
        """Arrays of the filled slots only (a saved file holds no growth padding)."""
        return {
            "meta": self.meta_state,
            "keys": self._filled_parts(self.key_store),
            "values": self._filled_parts(self.value_store),
            "recent_keys": self.recent_keys,
            "recent_values": self.recent_values,
            "sink_keys": self.sink_keys,
            "sink_values": self.sink_values,
            **(self._score_state() if self.policy.scored else {}),
        }

    def _score_state(self) -> dict[str, mx.array]:
        """What a scored policy decides by: slot positions and scores, recent-tier scores."""
        return {
            "slot_positions": self.policy.positions,
            "slot_scores": self.policy.scores,
            "recent_scores": self.recent_scores,
        }

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        meta = json.loads(state["meta"])
        self.config = KVConfig(**meta["config"])
        self.policy = policy_from_params(meta["policy"])
        self.residual, self.offset, self.flushed = meta["residual"], meta["offset"], meta["flushed"]
        self.stage = meta["stage"]
        self.key_store = store_from_params(*meta["key_store"])
        self.value_store = store_from_params(*meta["value_store"])
        self.key_store.parts = tuple(state.get("keys") or ()) or None
        self.value_store.parts = tuple(state.get("values") or ()) or None
        self.recent_keys = _none_if_empty(state.get("recent_keys"))
        self.recent_values = _none_if_empty(state.get("recent_values"))
        self.sink_keys = _none_if_empty(state.get("sink_keys"))
        self.sink_values = _none_if_empty(state.get("sink_values"))
        tiers = [t for t in (self.recent_keys, self.sink_keys) if t is not None]
        self.tier_dtype = tiers[0].dtype if tiers else mx.float16
        self.recent_scores = None
        if self.policy.scored:
            self.policy.positions, self.policy.scores = state["slot_positions"], state["slot_scores"]
            self.recent_scores = state["recent_scores"]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ComposedCache":
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.describe()}, offset={self.offset})"


def _append(tier: mx.array | None, x: mx.array) -> mx.array:
    return x if tier is None else mx.concatenate([tier, x], axis=2)


def _none_if_empty(x: mx.array | None) -> mx.array | None:
    return None if x is None or x.size == 0 else x


_EXACT = DenseStore()
"""The codec that multiplies with exact tokens (recent tier and the new chunk)."""


class QuantizedCache(ComposedCache):
    """Keeps every token; quantized as the config says (full precision without bits)."""

    def __init__(self, config: KVConfig) -> None:
        super().__init__(config, KeepAll(config.exact_sinks), config.effective_residual)


class SinkWindowCache(ComposedCache):
    """Bounded memory for endless generation: the first ``sinks`` tokens plus the most
    recent ``window`` tokens (StreamingLLM), quantized as the config says."""

    def __init__(self, config: KVConfig, window: int | None = None, sinks: int | None = None) -> None:
        sinks = config.sinks if sinks is None else sinks
        if window is None:
            if config.max_kv is None:
                raise ValueError("SinkWindowCache needs config.max_kv or a window")
            window = config.max_kv - sinks
        # A model's own short window (e.g. Gemma's 512) bounds the residual too.
        residual = min(config.effective_residual, window // 2)
        unit = config.precision.group if config.per_channel_keys else 1
        super().__init__(config, SinkWindow(sinks, window, residual, unit), residual)


class HeavyHitterCache(ComposedCache):
    """Bounded memory that keeps what attention uses (H2O, ``evict="h2o"``): the sinks, the
    newest ``residual`` tokens and the ``max_kv - sinks - residual`` older tokens with the
    highest accumulated attention, quantized as the config says."""

    def __init__(self, config: KVConfig) -> None:
        if config.max_kv is None or config.evict != "h2o":
            raise ValueError("HeavyHitterCache needs a config with evict='h2o' and max_kv")
        residual = config.effective_residual
        heavy = HeavyHitters(config.sinks, config.max_kv - config.sinks - residual, residual)
        super().__init__(config, heavy, residual)
