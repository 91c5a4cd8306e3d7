"""KV caches: storage (how tokens are packed), policy (which tokens stay), and their composition."""

from mlxkv.caches.cache import ComposedCache, HeavyHitterCache, QuantizedCache, SinkWindowCache
from mlxkv.caches.policy import HeavyHitters, KeepAll, SinkWindow
from mlxkv.caches.storage import ChannelQuantizedStore, DenseStore, QuantizedStore, TensorStore

__all__ = [
    "ChannelQuantizedStore", "ComposedCache", "DenseStore", "HeavyHitterCache", "HeavyHitters", "KeepAll",
    "QuantizedCache", "QuantizedStore", "SinkWindow", "SinkWindowCache", "TensorStore",
]
