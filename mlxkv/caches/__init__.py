"""KV caches: storage (how tokens are packed), policy (which tokens stay), and their composition."""

from mlxkv.caches.cache import ComposedCache, QuantizedCache, SinkWindowCache
from mlxkv.caches.policy import KeepAll, SinkWindow
from mlxkv.caches.storage import AffineStore, DenseStore, TensorStore

__all__ = [
    "AffineStore", "ComposedCache", "DenseStore", "KeepAll", "QuantizedCache",
    "SinkWindow", "SinkWindowCache", "TensorStore",
]
