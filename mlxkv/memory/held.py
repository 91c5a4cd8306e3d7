"""What a model's caches hold right now, counted one way for every report.

``nbytes`` (allocated, growth slack included: what memory really holds), filled bytes (the
tokens held, no slack), the bytes a 16-bit cache of the same tokens would take (the yardstick
whatever dtype a device computes in) and the part in mlxkv's 16-bit tiers (sinks and recent
tokens), which dominates short contexts. Generate, bench, eval and the tracker read these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

FP16_BYTES = 2


def layer_kv_bytes(cache: Sequence[Any]) -> list[int]:
    """Bytes each layer's cache allocates (``nbytes``), 0 for an empty or unsized cache."""
    sizes = []
    for layer_cache in cache:
        try:
            sizes.append(int(layer_cache.nbytes))
        except (AttributeError, NotImplementedError, TypeError):
            sizes.append(0)
    return sizes


def _flat(x: Any) -> list[mx.array]:
    if x is None:
        return []
    if isinstance(x, mx.array):
        return [x]
    return [a for item in x for a in _flat(item)]


def filled_bytes(layer_cache: Any) -> tuple[int, int] | None:
    """(bytes, tokens) one layer's cache holds without growth slack; None for caches that are
    not KV caches (recurrent state)."""
    if hasattr(layer_cache, "filled_nbytes"):  # mlxkv's caches count themselves
        return layer_cache.filled_nbytes, layer_cache.size()
    if not hasattr(layer_cache, "keys") or not hasattr(layer_cache, "offset"):
        return None
    arrays = _flat(layer_cache.keys) + _flat(layer_cache.values)
    if not arrays:
        return 0, 0
    slots = min(int(layer_cache.offset), arrays[0].shape[2])  # a rotating buffer holds fewer
    return sum(a.nbytes // a.shape[2] for a in arrays) * slots, slots


def kv_elements_per_token(model: nn.Module) -> int:
    """Key and value elements one token takes in one attention layer: 2 x kv_heads x head_dim
    (0 when the model hides its shape); on a rank of a tensor-parallel model, its own heads."""
    from mlxkv.caches.factory import model_head_dim
    from mlxkv.distributed import tensor_shards

    args = getattr(model, "args", None)
    heads = getattr(args, "num_key_value_heads", None) or getattr(args, "num_attention_heads", None)
    return 2 * (int(heads or 0) // tensor_shards(model)) * (model_head_dim(model) or 0)


def filled_totals(cache: Sequence[Any]) -> tuple[int, int]:
    """(bytes, tokens) held, summed over the KV caches of a model."""
    filled = [f for f in (filled_bytes(c) for c in cache) if f is not None]
    return sum(size for size, _ in filled), sum(held for _, held in filled)


def bits_per_element(model: nn.Module, cache: Sequence[Any]) -> float | None:
    """Bits the cache spends per key/value element it holds (filled bytes, tiers included);
    None when the model hides its shape or the cache is empty."""
    size, held = filled_totals(cache)
    elements = kv_elements_per_token(model) * held
    return 8 * size / elements if elements else None


@dataclass(frozen=True)
class KVHeld:
    allocated: int  # nbytes: buffers with their growth slack
    filled: int  # the tokens held
    fp16: int  # the same tokens in a 16-bit cache
    tiers: int  # of ``filled``: mlxkv's 16-bit sink and recent tiers

    @property
    def vs_fp16(self) -> float | None:
        return self.filled / self.fp16 if self.fp16 else None

    @property
    def mostly_tiers(self) -> bool:
        """Short contexts sit mostly in the 16-bit tiers: any bit width looks alike there."""
        return self.filled > 0 and self.tiers > self.filled / 2


def kv_held(model: nn.Module, cache: Sequence[Any]) -> KVHeld:
    size, held = filled_totals(cache)
    tiers = sum(getattr(c, "tier_nbytes", 0) for c in cache)
    return KVHeld(sum(layer_kv_bytes(cache)), size, FP16_BYTES * kv_elements_per_token(model) * held, tiers)
