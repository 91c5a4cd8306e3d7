"""The three caches users build, and the one rule that gives a layer its policy and residual.

``layer_policy`` is what both the caches and the memory planner call, so a prediction and
the cache it predicts are made from the same parts.
"""

from __future__ import annotations

from mlxkv.caches.cache import ComposedCache
from mlxkv.caches.policy import HeavyHitters, KeepAll, Policy, SinkWindow
from mlxkv.config import KVConfig


def layer_policy(config: KVConfig, window: int | None = None, sinks: int | None = None) -> tuple[Policy, int]:
    """(policy, residual) of one layer. ``window`` / ``sinks``: the model's own sliding window
    (tokens besides the kept first ones), which overrides ``config.max_kv``."""
    if window is None and config.max_kv is None:
        return KeepAll(config.exact_sinks), config.effective_residual
    if window is None and config.evict == "h2o":
        residual = config.effective_residual
        return HeavyHitters(config.sinks, config.max_kv - config.sinks - residual, residual), residual
    sinks = config.sinks if sinks is None else sinks
    window = config.max_kv - sinks if window is None else window
    residual = min(config.effective_residual, window // 2)  # a model's own short window bounds it too
    unit = config.precision.group if config.per_channel_keys else 1
    return SinkWindow(sinks, window, residual, unit), residual


class QuantizedCache(ComposedCache):
    """Keeps every token; quantized as the config says (full precision without bits)."""

    def __init__(self, config: KVConfig) -> None:
        super().__init__(config, *layer_policy(config.replace(max_kv=None, evict="window")))


class SinkWindowCache(ComposedCache):
    """Bounded memory for endless generation: the first ``sinks`` tokens plus the most
    recent ``window`` tokens (StreamingLLM), quantized as the config says."""

    def __init__(self, config: KVConfig, window: int | None = None, sinks: int | None = None) -> None:
        if window is None and config.max_kv is None:
            raise ValueError("SinkWindowCache needs config.max_kv or a window")
        if window is None:
            window = config.max_kv - (config.sinks if sinks is None else sinks)
        super().__init__(config, *layer_policy(config, window, sinks))


class HeavyHitterCache(ComposedCache):
    """Bounded memory that keeps what attention uses (H2O, ``evict="h2o"``): the sinks, the
    newest ``residual`` tokens and the ``max_kv - sinks - residual`` older tokens with the
    highest accumulated attention, quantized as the config says."""

    def __init__(self, config: KVConfig) -> None:
        if config.max_kv is None or config.evict != "h2o":
            raise ValueError("HeavyHitterCache needs a config with evict='h2o' and max_kv")
        super().__init__(config, *layer_policy(config))
