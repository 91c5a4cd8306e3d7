"""Bytes of mlx-lm's own caches (the baselines), following mlx-lm's growth rules.

mlxkv's caches count themselves through their CacheBook (``mlxkv.memory.cache_bytes``);
mlx-lm's ``KVCache``, ``QuantizedKVCache`` and ``RotatingKVCache`` are another library's code,
so their rules are mirrored here, and tests check the mirrors against the real caches'
``nbytes`` after the same chunks.
"""

from __future__ import annotations

from mlxkv.caches.book import STORE_STEP
from mlxkv.memory.layout import LayerSpec

GROWTH_STEP = STORE_STEP
"""Tokens mlx-lm's caches grow by (``KVCache.step``)."""


class CacheMirror:
    """Follows one mlx-lm cache's growth without storing anything. ``feed(n)`` as the model
    calls ``update_and_fetch`` with ``n`` tokens; ``fill(tokens)`` for tokens arriving one at
    a time from empty (a closed form)."""

    bytes_per_token: int  # bytes per stored token (all heads, keys and values)
    slots: int  # tokens the buffers have room for
    bounded = False  # stops growing at a fixed number of tokens

    def feed(self, n: int) -> None:
        raise NotImplementedError

    def fill(self, tokens: int) -> None:
        raise NotImplementedError

    @property
    def allocated_bytes(self) -> int:
        return self.slots * self.bytes_per_token

    @property
    def filled_bytes(self) -> int:
        raise NotImplementedError


def _round_up(n: int, step: int = GROWTH_STEP) -> int:
    return -(-n // step) * step


class MlxLmMirror(CacheMirror):
    """mlx-lm's ``KVCache`` and ``QuantizedKVCache``: grow by whole steps past what a chunk
    needs, trimming a partly filled last step first (so chunking changes the slack)."""

    def __init__(self, layer: LayerSpec, dtype_bytes: int, batch: int,
                 bits: int | None = None, group_size: int = 64) -> None:
        def one(dim: int) -> int:  # mlx-lm packs dim // (32 // bits) uint32s; scales in the dtype
            if bits is None:
                return dim * dtype_bytes
            return dim // (32 // bits) * 4 + 2 * dtype_bytes * (dim // group_size)

        self.bytes_per_token = layer.kv_heads * batch * (one(layer.key_dim) + one(layer.value_dim))
        self.offset = self.slots = 0

    def feed(self, n: int) -> None:
        if self.slots == 0 or self.offset + n > self.slots:
            if self.slots and self.offset % GROWTH_STEP:
                self.slots = self.offset
            self.slots += _round_up(n)
        self.offset += n

    def fill(self, tokens: int) -> None:
        self.offset, self.slots = tokens, _round_up(tokens)

    @property
    def filled_bytes(self) -> int:
        return self.offset * self.bytes_per_token


class RotatingMirror(CacheMirror):
    """mlx-lm's ``RotatingKVCache``: grows by steps to ``max_size`` one token at a time; a
    multi-token chunk is concatenated, briefly holding up to ``max_size + chunk - 1``."""

    bounded = True

    def __init__(self, layer: LayerSpec, dtype_bytes: int, batch: int, max_size: int, keep: int) -> None:
        self.bytes_per_token = layer.kv_heads * batch * (layer.key_dim + layer.value_dim) * dtype_bytes
        self.max_size, self.keep = max_size, keep
        self.offset = self.slots = self.idx = 0

    def feed(self, n: int) -> None:
        if n == 1:
            if self.slots == 0 or (self.offset >= self.slots and self.slots < self.max_size):
                self.slots += min(GROWTH_STEP, self.max_size - self.offset)
                self.idx = self.offset
            if self.slots > self.max_size:
                self.slots = self.idx = self.max_size
            if self.idx == self.max_size:
                self.idx = self.keep
            self.idx += 1
        else:
            if self.slots == 0:
                self.slots = n
            else:
                if self.idx != self.slots and self.idx >= self.offset:
                    self.slots = self.idx  # temporal order drops the unused tail
                trim = self.slots - self.max_size + 1
                self.slots = self.slots - max(trim, 0) + n
            self.idx = self.slots
        self.offset += n

    def fill(self, tokens: int) -> None:
        self.offset, self.slots = tokens, min(_round_up(tokens), self.max_size) if tokens else 0
        self.idx = 0

    @property
    def filled_bytes(self) -> int:
        return min(self.offset, self.max_size) * self.bytes_per_token


def mlx_lm_mirror(bits: int | None, group_size: int, max_kv: int | None, sinks: int, layer: LayerSpec,
                  dtype_bytes: int, batch: int) -> CacheMirror:
    """The cache mlx-lm's ``make_prompt_cache`` (and ``mlxkv.make_kv_cache`` with backend
    "mlx-lm") gives this layer."""
    if layer.window is not None:
        return RotatingMirror(layer, dtype_bytes, batch, layer.window, layer.keep)
    if bits is not None:
        return MlxLmMirror(layer, dtype_bytes, batch, bits, group_size)
    if max_kv is not None:
        return RotatingMirror(layer, dtype_bytes, batch, max_kv, sinks)
    return MlxLmMirror(layer, dtype_bytes, batch)
