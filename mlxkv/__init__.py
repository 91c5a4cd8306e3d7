"""mlxkv: small, bounded KV caches for long-context generation with MLX."""

from mlxkv import device  # noqa: F401  (first: picks the BLAS before MLX loads)

__version__ = "0.1.0"
