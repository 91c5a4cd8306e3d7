"""make_kv_cache: one cache per layer for a model and a KVConfig, honouring the model's own layout."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from mlxkv.attention import hook
from mlxkv.caches.kinds import HeavyHitterCache, QuantizedCache, SinkWindowCache
from mlxkv.config import KVConfig
from mlxkv.errors import UserError


def resolve_config(config: KVConfig | str | None) -> KVConfig:
    """A KVConfig from a config, a name such as "q4", or None (full precision)."""
    if config is None:
        return KVConfig()
    if isinstance(config, str):
        return KVConfig.from_name(config)
    return config


def make_kv_cache(model: nn.Module, config: KVConfig | str | None = None) -> list[Any]:
    """One cache per layer, usable as ``prompt_cache`` by mlx-lm's generate functions.

    Models that build their own caches (``model.make_cache()``) keep their layout: full-
    attention layers get a QuantizedCache (or with ``max_kv`` a SinkWindowCache, or with
    ``evict="h2o"`` a HeavyHitterCache), sliding-window layers a SinkWindowCache with the
    model's window, other layers (recurrent state, chunked attention) their own cache.
    """
    config = resolve_config(config)
    if hasattr(model, "make_cache"):
        template = model.make_cache()
    else:
        template = [KVCache() for _ in model.layers]
    if config.backend == "mlx-lm":
        return [_mlx_lm_cache(c, config) for c in template]
    head_dim = model_head_dim(model)
    if head_dim is not None:
        config.precision.check_head_dim(head_dim)
    config.precision.check_layers(len(template))
    hook.install()
    return [_mlxkv_cache(c, config.for_layer(i, len(template), sliding=type(c) is RotatingKVCache))
            for i, c in enumerate(template)]


def _mlxkv_cache(layer_cache: Any, config: KVConfig) -> Any:
    kind = type(layer_cache)
    if kind is KVCache:
        if config.max_kv is None:
            return QuantizedCache(config)
        return HeavyHitterCache(config) if config.evict == "h2o" else SinkWindowCache(config)
    if kind is RotatingKVCache:  # the model's own sliding window: its semantics, our storage
        keep = layer_cache.keep
        return SinkWindowCache(config, window=layer_cache.max_size - keep, sinks=keep)
    return layer_cache


def _mlx_lm_cache(layer_cache: Any, config: KVConfig) -> Any:
    """mlx-lm's own caches, as its generate would build them: the baselines we compare with."""
    if type(layer_cache) is not KVCache:
        return layer_cache  # mlx-lm cannot quantize rotating caches; they stay as the model made them
    if config.quantized:
        return QuantizedKVCache(group_size=config.group_size, bits=config.bits)
    if config.max_kv is not None:
        return RotatingKVCache(max_size=config.max_kv, keep=config.sinks)
    return layer_cache


def model_head_dim(model: nn.Module) -> int | None:
    """The attention head dimension from the model's args, when it declares one."""
    args = getattr(model, "args", None)
    if args is None:
        return None
    head_dim = getattr(args, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    if hidden and heads:
        return int(hidden // heads)
    return None


def model_fits(config: KVConfig, model: nn.Module) -> bool:
    """Whether ``make_kv_cache(model, config)`` would accept the config (head size, layers)."""
    try:
        head_dim = model_head_dim(model)
        if head_dim is not None:
            config.precision.check_head_dim(head_dim)
    except UserError:
        return False
    return True
