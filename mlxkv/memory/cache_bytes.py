"""KV-cache bytes predicted from a model's layout, without allocating anything.

For mlxkv's caches the prediction runs the very bookkeeping the caches run (``CacheBook``,
with the policy from ``layer_policy``) and prices store slots with the stores' own
``slot_bytes``: the planner and the caches cannot disagree, and tests check that the
prediction equals ``nbytes`` after the same chunks, for every config. mlx-lm's caches
(the baselines) follow mirrors of mlx-lm's rules (``mlxkv.memory.mlx_lm_bytes``).

"allocated" bytes include the growth slack (what memory really holds, ``nbytes``); "filled"
bytes count the tokens held.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mlxkv.caches.book import CacheBook
from mlxkv.caches.cache import stage_stores, tier_bytes
from mlxkv.caches.kinds import layer_policy
from mlxkv.config import KVConfig
from mlxkv.memory.layout import LayerSpec, ModelLayout
from mlxkv.memory.mlx_lm_bytes import mlx_lm_mirror

FP16_BYTES = 2

Layers = ModelLayout | LayerSpec | Sequence[LayerSpec | None]


class LayerBytes:
    """One layer's cache, counted: feed chunk sizes (``feed``) or a token count (``fill``)."""

    def __init__(self, config: KVConfig, layer: LayerSpec, dtype_bytes: int, batch: int) -> None:
        self.config, self.layer = config, layer
        rows = layer.kv_heads * batch
        if config.backend == "mlx-lm":
            self.mirror = mlx_lm_mirror(config.bits, config.group_size, config.max_kv, config.sinks, layer,
                                        dtype_bytes, batch)
            self.book = None
            return
        self.mirror = None
        window, sinks = (layer.window - layer.keep, layer.keep) if layer.window is not None else (None, None)
        policy, residual = layer_policy(config, window, sinks)
        p = config.precision
        self.book = CacheBook(policy, residual, config.stages, p.group, p.per_channel_keys)
        self._capacity = policy.capacity
        self._rows, self._dtype_bytes = rows, dtype_bytes
        self._tier_rate = rows * (layer.key_dim + layer.value_dim) * tier_bytes(dtype_bytes, config.quantized)

    def _rate(self, stage: int) -> int:
        """Bytes per store slot (keys and values, all heads) at a precision stage."""
        keys, values = stage_stores(self.config, stage, self._capacity)
        return (keys.slot_bytes(self._rows, self.layer.key_dim, self._dtype_bytes)
                + values.slot_bytes(self._rows, self.layer.value_dim, self._dtype_bytes))

    def feed(self, n: int) -> None:
        if self.book is None:
            self.mirror.feed(n)
        else:
            self.book.next_stage()
            self.book.plan(n)

    def fill(self, tokens: int) -> None:
        if self.book is None:
            self.mirror.fill(tokens)
        else:
            self.book.fill(tokens)

    @property
    def bytes_per_token(self) -> int:
        """What each new token adds once stored at the last precision stage (the asymptotic rate)."""
        if self.book is None:
            return self.mirror.bytes_per_token
        return self._rate(len(self.config.stages) - 1)

    @property
    def bounded(self) -> bool:
        """The cache stops growing (a model's sliding window, a ``max_kv`` window, H2O)."""
        return self.mirror.bounded if self.book is None else self._capacity is not None

    @property
    def allocated_bytes(self) -> int:
        if self.book is None:
            return self.mirror.allocated_bytes
        return self.book.allocated * self._rate(self.book.stage) + self.book.tier_tokens * self._tier_rate

    @property
    def filled_bytes(self) -> int:
        if self.book is None:
            return self.mirror.filled_bytes
        return self.book.stored * self._rate(self.book.stage) + self.book.tier_tokens * self._tier_rate


def layer_bytes(config: KVConfig | str, layers: Layers, dtype_bytes: int = FP16_BYTES,
                batch: int = 1) -> list[LayerBytes | None]:
    """One counter per cache of the model (None where the cache is not a KV cache), with
    per-layer bits applied as ``make_kv_cache`` does."""
    config, specs = as_config(config), as_layers(layers)
    return [None if layer is None else LayerBytes(_for_layer(config, i, specs), layer, dtype_bytes, batch)
            for i, layer in enumerate(specs)]


def _for_layer(config: KVConfig, i: int, specs: Sequence[LayerSpec | None]) -> KVConfig:
    """The config ``make_kv_cache`` gives layer ``i`` (per-layer bits, window-layer bits)."""
    return config.for_layer(i, len(specs), sliding=specs[i].window is not None)


def kv_bytes_per_token(config: KVConfig | str, layers: Layers, dtype_bytes: int = FP16_BYTES, batch: int = 1) -> int:
    """Bytes each new token adds to the cache at long context (all layers, keys and values):
    the layers that keep growing, at their stored precision; bounded caches (a model's
    sliding-window layers, a ``max_kv`` window) add nothing once full, so a cache bounded
    everywhere adds 0. The 16-bit tiers and growth slack are bounded extras.
    Llama-3-8B: fp16 131,072; 4-bit g64 36,864. Gemma 3 270M fp16: 3,072 (3 of 18 layers grow)."""
    return sum(c.bytes_per_token for c in layer_bytes(config, layers, dtype_bytes, batch)
               if c is not None and not c.bounded)


def stored_bytes_per_token(config: KVConfig | str, layers: Layers, dtype_bytes: int = FP16_BYTES,
                           batch: int = 1) -> int:
    """Bytes one token takes once stored in every layer, bounded or not: the precision
    (bits per element) of the cache, whatever its length."""
    return sum(c.bytes_per_token for c in layer_bytes(config, layers, dtype_bytes, batch) if c is not None)


def predict_layer_bytes(config: KVConfig | str, layers: Layers, tokens: int | None = None, *,
                        chunks: Iterable[int] | None = None, dtype_bytes: int = FP16_BYTES, batch: int = 1,
                        allocated: bool = True) -> list[int]:
    """Bytes of each cache after ``tokens`` tokens arrived one at a time, or after the chunk
    sizes in ``chunks`` (a prefill, then decode steps); 0 for caches that are not KV caches."""
    if (tokens is None) == (chunks is None):
        raise ValueError("pass tokens or chunks")
    chunk_list = list(chunks) if chunks is not None else None
    config, specs = as_config(config), as_layers(layers)
    done: dict[tuple[KVConfig, LayerSpec], int] = {}  # identical layers share one count
    result = []
    for i, layer in enumerate(specs):
        if layer is None:
            result.append(0)
            continue
        key = (_for_layer(config, i, specs), layer)
        if key not in done:
            counter = LayerBytes(*key, dtype_bytes, batch)
            if chunk_list is None:
                counter.fill(int(tokens))
            else:
                for n in chunk_list:
                    counter.feed(n)
            done[key] = counter.allocated_bytes if allocated else counter.filled_bytes
        result.append(done[key])
    return result


def predict_kv_bytes(config: KVConfig | str, layers: Layers, tokens: int | None = None, **kwargs: Any) -> int:
    """Total KV bytes after ``tokens`` (or ``chunks=``); see ``predict_layer_bytes``."""
    return sum(predict_layer_bytes(config, layers, tokens, **kwargs))


def as_layers(layers: Layers) -> Sequence[LayerSpec | None]:
    if isinstance(layers, ModelLayout):
        return layers.layers
    if isinstance(layers, LayerSpec):
        return [layers]
    return layers


def as_config(config: KVConfig | str) -> KVConfig:
    from mlxkv.config.spec import parse_spec

    return parse_spec(config) if isinstance(config, str) else config
