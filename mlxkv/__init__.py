"""mlxkv: small, bounded KV caches for long-context generation with MLX.

    import mlxkv, mlx_lm
    model, tokenizer = mlxkv.load()                      # default model, offline
    cache = mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=4, max_kv=4096))
    mlx_lm.generate(model, tokenizer, "Hello", prompt_cache=cache)
"""

from mlxkv import device  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.attention import hook as _hook
from mlxkv.caches import HeavyHitterCache, QuantizedCache, SinkWindowCache
from mlxkv.caches.factory import make_kv_cache
from mlxkv.caches.prompt_cache import load_prompt_cache, save_prompt_cache
from mlxkv.config import KVConfig
from mlxkv.errors import UserError

__version__ = "0.1.0"

_hook.install()


def load(model: str | None = None, **kwargs):
    """Load ``(model, tokenizer)``: a .gguf file, a local mlx-lm directory, a Hugging Face
    repo id, or None for the default model. See ``mlxkv.loading.load``."""
    from mlxkv.loading import load as _load

    return _load(model, **kwargs)


__all__ = [
    "HeavyHitterCache", "KVConfig", "QuantizedCache", "SinkWindowCache", "UserError", "load", "load_prompt_cache",
    "make_kv_cache", "save_prompt_cache",
]
