"""mlxkv caches: a storage and a policy composed behind mlx-lm's cache protocol.

Tokens live in two tiers. The newest ``residual`` tokens stay in 16-bit floats; older ones
are flushed into the stores (keys and values each with their own encoding), placed by the
policy. Attention sees the packed history plus the exact recent tokens and the new chunk,
so a prompt chunk attends to itself exactly and only the history is quantized.

``QuantizedCache`` keeps every token; ``SinkWindowCache`` keeps the sinks plus a window.
Both are full precision when their config has no bits. They follow mlx-lm's protocol
(``update_and_fetch``, ``state``, ``meta_state``, ``offset``, ``trim``, ``nbytes``,
``make_mask``, ``empty``), so mlx-lm's generate loop and prompt caching handle them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import mlx.core as mx

from mlxkv.attention.view import KVView, Segment
from mlxkv.caches.policy import KeepAll, SinkWindow, policy_from_params
from mlxkv.caches.storage import DenseStore, TensorStore, convert_store, make_store, store_from_params
from mlxkv.config import KVConfig


def _recent_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """16-bit for the residual tier: what a Mac holds, even when a CPU computes in float32."""
    return dtype if dtype in (mx.float16, mx.bfloat16) else mx.float16


class ComposedCache:
    """One attention layer's cache: key store + value store + policy + 16-bit recent tier."""

    def __init__(self, config: KVConfig, policy: KeepAll | SinkWindow, residual: int) -> None:
        self.config = config
        self.policy = policy
        self.residual = residual  # newest tokens kept in 16-bit (0 for full-precision configs)
        self.offset = 0  # tokens seen; also the rope position of the next token
        self.flushed = 0  # tokens that went through the stores (positions < flushed)
        self.recent_keys: mx.array | None = None  # positions [flushed, offset)
        self.recent_values: mx.array | None = None
        self.packed = config.quantized and config.quantized_kv_start == 0
        self.key_store, self.value_store = self._make_stores()

    # -- construction -------------------------------------------------------------
    def _make_stores(self) -> tuple[TensorStore, TensorStore]:
        cfg, cap = self.config, self.policy.capacity
        if not self.packed:
            return make_store(None, cfg.group_size, cap), make_store(None, cfg.group_size, cap)
        # A ring's slots are not group-aligned: windows keep per-token keys.
        per_channel = cfg.per_channel_keys and not self.policy.bounded
        return (
            make_store(cfg.key_bits, cfg.group_size, cap, per_channel=per_channel),
            make_store(cfg.value_bits, cfg.group_size, cap),
        )

    def _maybe_start_quantizing(self) -> None:
        """quantized_kv_start: re-encode the full-precision store in place, once."""
        if self.packed or not self.config.quantized or self.offset < self.config.quantized_kv_start:
            return
        self.packed = True
        dense_k, dense_v = self.key_store, self.value_store
        new_k, new_v = self._make_stores()
        # Stores written a group at a time take whole groups: the rest returns to the 16-bit tier.
        aligned = self.flushed - self.flushed % self._flush_unit(new_k, new_v)
        if aligned < self.flushed:
            tail = (slice(None), slice(None), slice(aligned, self.flushed))
            tail_k, tail_v = dense_k.parts[0][tail], dense_v.parts[0][tail]
            if self.recent_keys is not None:
                tail_k = mx.concatenate([tail_k.astype(self.recent_keys.dtype), self.recent_keys], axis=2)
                tail_v = mx.concatenate([tail_v.astype(self.recent_values.dtype), self.recent_values], axis=2)
            self.recent_keys = tail_k.astype(_recent_dtype(tail_k.dtype))
            self.recent_values = tail_v.astype(_recent_dtype(tail_v.dtype))
            self.flushed = aligned
        self.key_store = convert_store(dense_k, new_k)
        self.value_store = convert_store(dense_v, new_v)

    @staticmethod
    def _flush_unit(*stores: TensorStore) -> int:
        return max(store.token_unit for store in stores)

    # -- the protocol ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KVView, KVView]:
        """Store a chunk ([B, H, n, D], rope applied) and return what attention must see."""
        if self.offset == 0 and self.config.quantized:
            self.config.check_head_dim(keys.shape[-1])
            self.config.check_head_dim(values.shape[-1])
        self._maybe_start_quantizing()
        n = keys.shape[2]
        first, end = self.offset, self.offset + n
        exact_start = self.flushed
        if self.recent_keys is not None:
            keys_exact = mx.concatenate([self.recent_keys.astype(keys.dtype), keys], axis=2)
            values_exact = mx.concatenate([self.recent_values.astype(values.dtype), values], axis=2)
        else:
            keys_exact, values_exact = keys, values

        lossless = not (self.key_store.lossy or self.value_store.lossy)
        residual = self.residual
        unit = self._flush_unit(self.key_store, self.value_store)
        n_flush = (max(self.flushed, end - residual) - self.flushed) // unit * unit
        new_flushed = self.flushed + n_flush
        # Writing into slots that queries of this chunk still need: read the store first.
        read_first = n > 1 and self.policy.overwrites(self.flushed, n_flush)
        if read_first:
            history = self._history_segment(first, n, self.flushed, hide_from=exact_start, snapshot=True)

        for slot, row, length in self.policy.placements(self.flushed, n_flush):
            self.key_store.write(slot, keys_exact[..., row : row + length, :])
            self.value_store.write(slot, values_exact[..., row : row + length, :])

        if n_flush < keys_exact.shape[2]:
            recent_dtype = _recent_dtype(keys.dtype)
            self.recent_keys = keys_exact[..., n_flush:, :].astype(recent_dtype)
            self.recent_values = values_exact[..., n_flush:, :].astype(recent_dtype)
        else:
            self.recent_keys = self.recent_values = None
        self.flushed, self.offset = new_flushed, end

        if read_first:
            segments = [history, self._exact_segment(keys_exact, values_exact, exact_start, first)]
        elif lossless and self.recent_keys is None:
            # Everything is exact in the store already: one segment, mlx's fused attention.
            segments = [self._history_segment(first, n, self.flushed, hide_from=end)]
        else:
            segments = [
                self._history_segment(first, n, self.flushed, hide_from=exact_start),
                self._exact_segment(keys_exact, values_exact, exact_start, first),
            ]
        view = KVView([s for s in segments if s is not None])
        return view, view

    def _history_segment(
        self, q_first: int, n_queries: int, flushed: int, hide_from: int, snapshot: bool = False
    ) -> Segment | None:
        """The stored tokens with positions < hide_from, as seen by queries q_first.. ."""
        if flushed == 0 or self.key_store.parts is None:
            return None
        slot_pos = self.policy.slot_positions(flushed)
        if slot_pos is None:  # KeepAll: slot i holds position i
            n_slots = min(flushed, hide_from)
            if n_slots == 0:
                return None
            if n_slots <= q_first + 1:  # every slot is at or before the first query
                mask = None
            elif n_slots == q_first + n_queries:
                mask = "causal"
            else:
                mask = self.policy.visible(mx.arange(q_first, q_first + n_queries), mx.arange(n_slots))
        else:
            n_slots = slot_pos.shape[0]
            q_pos = mx.arange(q_first, q_first + n_queries)
            mask = (slot_pos < hide_from)[None, :] & self.policy.visible(q_pos, slot_pos)
        return Segment(
            self.key_store.read(n_slots, snapshot), self.value_store.read(n_slots, snapshot),
            self.key_store, self.value_store, n_slots, mask,
        )

    def _exact_segment(self, keys: mx.array, values: mx.array, start: int, q_first: int) -> Segment:
        """Recent tokens and the new chunk, exact; the chunk's queries are its last rows."""
        n_keys, n_queries = keys.shape[2], self.offset - q_first
        if n_queries == 1 and not self.policy.limits_view():
            mask = None
        elif not self.policy.limits_view():
            mask = "causal"
        else:
            mask = self.policy.visible(mx.arange(q_first, self.offset), mx.arange(start, start + n_keys))
        return Segment((keys,), (values,), _EXACT, _EXACT, n_keys, mask)

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
        recent = 0 if self.recent_keys is None else self.recent_keys.nbytes + self.recent_values.nbytes
        return self.key_store.nbytes + self.value_store.nbytes + recent

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
        self.flushed -= n - min(n, n_recent)
        self.offset -= n
        self._realign_flushed()
        return n

    def _realign_flushed(self) -> None:
        """After a trim into a store written a group at a time, move the cut group back to
        the 16-bit tier (decoded), so the next flush starts on a group boundary."""
        unit = self._flush_unit(self.key_store, self.value_store)
        aligned = self.flushed - self.flushed % unit
        if aligned == self.flushed:
            return
        keys = self.key_store.decode(self.key_store.read_range(aligned, aligned + unit))
        values = self.value_store.decode(self.value_store.read_range(aligned, aligned + unit))
        dtype = _recent_dtype(keys.dtype)
        self.recent_keys = keys[..., : self.flushed - aligned, :].astype(dtype)
        self.recent_values = values[..., : self.flushed - aligned, :].astype(dtype)
        self.flushed = aligned

    # -- saving ---------------------------------------------------------------------
    @property
    def meta_state(self) -> str:
        """Everything that is not an array, as one JSON string."""
        return json.dumps(
            {
                "config": dataclasses.asdict(self.config),
                "policy": self.policy.params(),
                "residual": self.residual,
                "offset": self.offset,
                "flushed": self.flushed,
                "packed": self.packed,
                "key_store": [type(self.key_store).__name__, self.key_store.params()],
                "value_store": [type(self.value_store).__name__, self.value_store.params()],
            }
        )

    @property
    def state(self) -> dict[str, Any]:
        """Arrays of the filled slots only (a saved file holds no growth padding)."""
        filled = min(self.flushed, self.key_store.capacity)
        return {
            "meta": self.meta_state,
            "keys": list(self.key_store.read(filled)) if filled else [],
            "values": list(self.value_store.read(filled)) if filled else [],
            "recent_keys": self.recent_keys,
            "recent_values": self.recent_values,
        }

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        meta = json.loads(state["meta"])
        self.config = KVConfig(**meta["config"])
        self.policy = policy_from_params(meta["policy"])
        self.residual, self.offset, self.flushed = meta["residual"], meta["offset"], meta["flushed"]
        self.packed = meta["packed"]
        self.key_store = store_from_params(*meta["key_store"])
        self.value_store = store_from_params(*meta["value_store"])
        self.key_store.parts = tuple(state.get("keys") or ()) or None
        self.value_store.parts = tuple(state.get("values") or ()) or None
        self.recent_keys = _none_if_empty(state.get("recent_keys"))
        self.recent_values = _none_if_empty(state.get("recent_values"))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ComposedCache":
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.describe()}, offset={self.offset})"


def _none_if_empty(x: mx.array | None) -> mx.array | None:
    return None if x is None or x.size == 0 else x


_EXACT = DenseStore()
"""The codec that multiplies with exact tokens (recent tier and the new chunk)."""


class QuantizedCache(ComposedCache):
    """Keeps every token; quantized as the config says (full precision without bits)."""

    def __init__(self, config: KVConfig) -> None:
        super().__init__(config, KeepAll(), config.effective_residual)


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
        super().__init__(config, SinkWindow(sinks, window, residual), residual)
