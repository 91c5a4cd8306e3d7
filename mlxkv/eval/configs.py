"""The caches an evaluation compares: named specs ("q4:residual=64"), KVConfigs, or any
factory (a test's deliberately broken cache), and the bytes each holds once filled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.caches.cache import ComposedCache
from mlxkv.caches.factory import make_kv_cache, model_head_dim
from mlxkv.config import KVConfig, parse_config_spec
from mlxkv.errors import UserError

DEFAULT_REFERENCE = "mlxlm-fp16"
"""The full-precision reference: the model's own mlx-lm cache, independent of mlxkv's code
(on a CPU device it holds float32; on a Mac the model's float16)."""


@dataclass(frozen=True)
class CacheSpec:
    """One row of an evaluation: a label and how to build fresh per-layer caches."""

    label: str
    make: Callable[[nn.Module], list[Any]]
    config: KVConfig | None = None

    @property
    def description(self) -> str:
        return self.config.describe() if self.config is not None else self.label


def as_spec(item: str | KVConfig | CacheSpec) -> CacheSpec:
    """A CacheSpec from a spec string (see ``parse_config_spec``), a KVConfig or a CacheSpec."""
    if isinstance(item, CacheSpec):
        return item
    if isinstance(item, KVConfig):
        config, label = item, item.describe()
    else:
        label = item.strip()
        config = parse_config_spec(label)
    return CacheSpec(label, lambda model, c=config: make_kv_cache(model, c), config)


def parse_specs(items: str | Sequence[str | KVConfig | CacheSpec]) -> list[CacheSpec]:
    """Specs from a comma-separated string or a list; duplicates dropped, order kept."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    specs: dict[str, CacheSpec] = {}
    for item in items:
        spec = as_spec(item)
        specs.setdefault(spec.label, spec)
    if not specs:
        raise UserError(f"no KV configs given; choose from {', '.join(KVConfig.names())}")
    return list(specs.values())


# -- what a cache holds -----------------------------------------------------------------
def _flat(x: Any) -> list[mx.array]:
    if x is None:
        return []
    if isinstance(x, mx.array):
        return [x]
    return [a for item in x for a in _flat(item)]


def filled_bytes(layer_cache: Any) -> tuple[int, int] | None:
    """(bytes, tokens) one layer's cache holds: packed data, scales, biases and the 16-bit
    residual tier for the tokens it keeps, without the slack of buffers grown in steps of
    256 tokens. None for caches that are not KV caches (recurrent state)."""
    if isinstance(layer_cache, ComposedCache):
        return layer_cache.filled_nbytes, layer_cache.size()
    if not hasattr(layer_cache, "keys") or not hasattr(layer_cache, "offset"):
        return None
    arrays = _flat(layer_cache.keys) + _flat(layer_cache.values)
    if not arrays:
        return 0, 0
    slots = min(int(layer_cache.offset), arrays[0].shape[2])  # a rotating buffer holds fewer
    return sum(a.nbytes // a.shape[2] for a in arrays) * slots, slots


def kv_elements_per_token(model: nn.Module) -> int:
    """Key and value elements one token takes in one attention layer: 2 x kv_heads x
    head_dim (0 when the model hides its shape)."""
    args = getattr(model, "args", None)
    heads = getattr(args, "num_key_value_heads", None) or getattr(args, "num_attention_heads", None)
    return 2 * int(heads or 0) * (model_head_dim(model) or 0)


def filled_totals(cache: Sequence[Any]) -> tuple[int, int]:
    """(bytes, tokens) held, summed over the KV caches of a model (see ``filled_bytes``)."""
    filled = [f for f in (filled_bytes(c) for c in cache) if f is not None]
    return sum(size for size, _ in filled), sum(held for _, held in filled)


def bits_per_element(model: nn.Module, cache: Sequence[Any]) -> float | None:
    """Bits the cache spends per key/value element it holds: all filled bytes over
    2 x kv_heads x head_dim x tokens held, summed over attention layers. None when the
    model hides its shape or the cache is empty."""
    size, held = filled_totals(cache)
    elements = kv_elements_per_token(model) * held
    if not elements:
        return None
    return 8 * size / elements
