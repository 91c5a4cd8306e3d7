"""Routing mlx-lm's attention to mlxkv caches, without touching mlx-lm's models.

Every mlx-lm model calls ``scaled_dot_product_attention(queries, keys, values, cache,
scale, mask)``, imported from ``mlx_lm.models.base`` into its own module namespace. On
``import mlxkv`` we replace that function in ``mlx_lm.models.base`` (so models imported
later pick up ours) and in every already-imported ``mlx_lm.models.*`` module that holds the
original (so models imported earlier do too). The replacement looks at what the cache
returned: a ``KVView`` (our caches) goes to ``mlxkv.attention.sdpa.attend``; anything else
goes, unchanged, to mlx-lm's own function. mlx-lm's caches therefore behave exactly as
before, and ``uninstall()`` restores the original everywhere.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx_lm.models.base as mlx_lm_base

from mlxkv.attention.sdpa import attend
from mlxkv.attention.view import KVView

_original = mlx_lm_base.scaled_dot_product_attention


def scaled_dot_product_attention(
    queries: mx.array,
    keys,
    values,
    cache,
    scale: float,
    mask,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's signature; dispatches on what the cache returned."""
    if isinstance(keys, KVView):
        return attend(queries, keys, scale=scale, sinks=sinks)
    return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def _modules():
    return [m for name, m in list(sys.modules.items()) if name.startswith("mlx_lm.models") and m]


def install() -> None:
    """Route attention of every mlx-lm model (imported before or after) through mlxkv."""
    for module in _modules():
        if getattr(module, "scaled_dot_product_attention", None) is _original:
            module.scaled_dot_product_attention = scaled_dot_product_attention


def uninstall() -> None:
    for module in _modules():
        if getattr(module, "scaled_dot_product_attention", None) is scaled_dot_product_attention:
            module.scaled_dot_product_attention = _original


def installed() -> bool:
    return mlx_lm_base.scaled_dot_product_attention is scaled_dot_product_attention
