"""Saving and restoring prompt caches that hold mlxkv caches.

mlx-lm's ``save_prompt_cache`` already writes our caches (it stores ``state`` and the class
name). Its loader looks class names up in ``mlx_lm.models.cache``; we register ours there
and delegate, so one file format serves both tools and mixed cache lists restore too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx_lm.models.cache as mlx_lm_cache

from mlxkv.caches.cache import ComposedCache, QuantizedCache, SinkWindowCache
from mlxkv.errors import UserError

_OURS = (ComposedCache, QuantizedCache, SinkWindowCache)


def register_classes() -> None:
    """Make mlx-lm's loader know mlxkv's cache classes by name."""
    for cls in _OURS:
        setattr(mlx_lm_cache, cls.__name__, cls)


def save_prompt_cache(path: str | Path, cache: list[Any], metadata: dict[str, str] | None = None) -> None:
    """Write a prompt cache (ours or mlx-lm's) to a ``.safetensors`` file."""
    mlx_lm_cache.save_prompt_cache(str(path), cache, metadata)


def load_prompt_cache(path: str | Path, return_metadata: bool = False):
    """Restore a prompt cache saved by ``save_prompt_cache`` (ours or mlx-lm's), bit-exactly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt cache {path} does not exist; create it with 'mlxkv generate --prompt-cache {path}'")
    register_classes()
    try:
        return mlx_lm_cache.load_prompt_cache(str(path), return_metadata=return_metadata)
    except Exception as e:  # corrupt or foreign file: mlx raises RuntimeError/ValueError/KeyError
        raise UserError(f"{path} is not a readable prompt cache ({type(e).__name__}: {e}); delete it and save it again") from None
