"""KV caches: storage (how tokens are packed), policy (which tokens stay), and their composition."""

from mlxkv.caches.book import CacheBook, ChunkPlan
from mlxkv.caches.cache import ComposedCache
from mlxkv.caches.kinds import HeavyHitterCache, QuantizedCache, SinkWindowCache, layer_policy
from mlxkv.caches.policy import HeavyHitters, KeepAll, Policy, SinkWindow
from mlxkv.caches.storage import ChannelQuantizedStore, DenseStore, QuantizedStore, TensorStore

__all__ = [
    "CacheBook", "ChunkPlan", "Policy", "layer_policy", "ChannelQuantizedStore", "ComposedCache", "DenseStore", "HeavyHitterCache", "HeavyHitters", "KeepAll",
    "QuantizedCache", "QuantizedStore", "SinkWindow", "SinkWindowCache", "TensorStore",
]
