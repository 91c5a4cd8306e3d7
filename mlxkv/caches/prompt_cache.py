"""Saving and restoring prompt caches that hold mlxkv caches.

mlx-lm's ``save_prompt_cache`` already writes our caches (it stores ``state`` and the class
name). Its loader looks class names up in ``mlx_lm.models.cache``; we register ours there
and delegate, so one file format serves both tools and mixed cache lists restore too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx_lm.models.cache as mlx_lm_cache

from mlxkv.caches.cache import ComposedCache
from mlxkv.caches.kinds import HeavyHitterCache, QuantizedCache, SinkWindowCache
from mlxkv.errors import UserError

_OURS = (ComposedCache, QuantizedCache, SinkWindowCache, HeavyHitterCache)


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


def check_prompt_cache_path(path: str | Path, option: str = "--prompt-cache") -> None:
    """Before anything runs: the file can be read (if it exists) or written (if not)."""
    import os

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name such as {path / 'prompt.safetensors'}")
    if path.suffix != ".safetensors":
        raise UserError(f"{option} files end in .safetensors; got {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        raise UserError(f"{option} {path} is not writable; choose another path")


class PromptCacheFile:
    """A saved prompt for ``mlxkv generate --prompt-cache``: the cache plus the token ids, KV
    config and model it was made with, so a later run can check all three and reuse the
    longest common prefix of its own prompt."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, cache: list[Any], tokens: list[int], config: Any, model_id: str) -> None:
        """Write atomically: a half-written file never replaces a good one."""
        metadata = {
            "mlxkv_tokens": json.dumps(list(map(int, tokens))),
            "mlxkv_config": json.dumps(config.to_dict()),
            "mlxkv_model": model_id,
        }
        tmp = self.path.with_name(f".{self.path.stem}.partial.safetensors")
        try:
            save_prompt_cache(tmp, cache, metadata)
            tmp.replace(self.path)
        except (OSError, RuntimeError) as e:  # RuntimeError: MLX's writer (disk full, /proc)
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write the prompt cache {self.path}: {e}") from None

    def load(self, config: Any, model_id: str) -> tuple[list[Any], list[int]]:
        """(cache, the tokens it holds) when it was saved for this model and KV config."""
        cache, meta = load_prompt_cache(self.path, return_metadata=True)
        if "mlxkv_tokens" not in meta:
            raise UserError(f"{self.path} was not saved by 'mlxkv generate --prompt-cache'; use another file name")
        if meta.get("mlxkv_model") != model_id:
            raise UserError(
                f"{self.path} was saved for model {meta.get('mlxkv_model')}, not {model_id}; use another file name"
            )
        saved = type(config)(**json.loads(meta["mlxkv_config"]))
        if saved != config:
            raise UserError(
                f"{self.path} was saved with KV cache '{saved.describe()}'; pass the same KV flags or use another file name"
            )
        return cache, json.loads(meta["mlxkv_tokens"])
