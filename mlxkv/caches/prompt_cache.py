"""Saving and restoring prompt caches that hold mlxkv caches.

mlx-lm's ``save_prompt_cache`` already writes our caches (it stores ``state`` and the class
name). Its loader looks class names up in ``mlx_lm.models.cache``; we register ours there
and delegate, so one file format serves both tools and mixed cache lists restore too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlx_lm.models.cache as mlx_lm_cache

from mlxkv.caches.cache import ComposedCache, HeavyHitterCache, QuantizedCache, SinkWindowCache
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


class PromptCacheFile:
    """A saved prompt prefix for ``mlxkv generate --prompt-cache``: the cache plus the token
    ids, KV config and model it was made with, so reuse can check that all three match."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, cache: list[Any], tokens: list[int], config: Any, model_id: str) -> None:
        if self.path.suffix != ".safetensors":
            raise UserError(f"prompt cache files end in .safetensors; got {self.path}")
        metadata = {
            "mlxkv_tokens": json.dumps(list(map(int, tokens))),
            "mlxkv_config": json.dumps(dataclasses.asdict(config)),
            "mlxkv_model": model_id,
        }
        tmp = self.path.with_name(self.path.stem + ".partial.safetensors")
        save_prompt_cache(tmp, cache, metadata)
        tmp.replace(self.path)  # never leave a half-written file under the user's name

    def reuse(self, tokens: list[int], config: Any, model_id: str) -> tuple[list[Any], list[int]]:
        """The saved cache and the tokens of ``tokens`` it does not hold yet."""
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
        saved_tokens = json.loads(meta["mlxkv_tokens"])
        if tokens[: len(saved_tokens)] != saved_tokens:
            raise UserError(
                f"the prompt does not start with the prefix saved in {self.path}; use another file name for this prompt"
            )
        rest = tokens[len(saved_tokens):]
        if not rest:  # generation needs at least one token to feed
            if not all(c.is_trimmable() for c in cache):
                raise UserError(f"the prompt equals the prefix in {self.path}; add text after it")
            for c in cache:
                c.trim(1)
            rest = tokens[-1:]
        return cache, rest
