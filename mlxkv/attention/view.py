"""KVView: what a cache hands to attention instead of a keys array.

mlx-lm models call ``keys, values = cache.update_and_fetch(k, v)`` and pass both to
``scaled_dot_product_attention``. Our caches return a KVView in place of the arrays: the
cached tokens as segments (packed history, exact recent tokens), each with the store that
can multiply with it and a mask saying which tokens each query sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:  # storage imports nothing from attention; keep it that way at run time too
    from mlxkv.caches.storage import Parts, TensorStore

Mask = "None | str | mx.array"
"""None: every key visible to every query; "causal": the last L keys are the L queries;
or a bool array [L, T] (True = visible)."""


class NotAnArrayError(AttributeError):
    """A model used the cache's output as an array instead of passing it to attention."""


@dataclass
class Segment:
    """``length`` tokens, packed as ``key_store`` / ``value_store`` encode them."""

    keys: Parts
    values: Parts
    key_store: TensorStore
    value_store: TensorStore
    length: int
    mask: Mask = None


@dataclass
class KVView:
    """``rotated``: keys and values were stored Hadamard-rotated; attention rotates the
    queries the same way and rotates the output back. ``observer``: called by attention with
    each segment's attention weights, summed over heads and queries, per batch row (one
    float32 array [B, T] per segment, in order): how a cache that evicts by attention learns the scores."""

    segments: list[Segment]
    rotated: bool = False
    observer: Callable[[list[mx.array]], None] | None = None

    def __getattr__(self, name: str):
        raise NotAnArrayError(
            f"an mlxkv cache returned its tokens to code that reads '.{name}' directly; this "
            "model's attention does not go through mlx_lm.models.base.scaled_dot_product_attention, "
            "so it cannot use mlxkv caches (use mlx-lm's own caches for it)"
        )
