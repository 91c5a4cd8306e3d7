"""Running a model over tokens with a cache, in chunks: shared by generate, bench and eval."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

DEFAULT_PREFILL_STEP_SIZE = 2048
"""Prompt tokens per forward pass of a prefill: mlx-lm's ``prefill_step_size`` and its default."""


def _as_tokens(tokens: mx.array | list[int]) -> mx.array:
    return tokens if isinstance(tokens, mx.array) else mx.array(tokens)


def forward_chunks(
    model: nn.Module, tokens: mx.array | list[int], cache: list[Any], chunk_size: int
) -> Iterator[mx.array]:
    """Feed ``tokens`` through ``model`` ``chunk_size`` at a time, yielding each chunk's logits
    ([chunk, vocab], evaluated): for callers that need every position (``eval kld``). Small
    chunks make quantized history shape attention the way generation does; a prompt that
    only needs its last token's logits goes through ``prefill``."""
    tokens = _as_tokens(tokens)
    for start in range(0, tokens.size, chunk_size):
        logits = model(tokens[None, start : start + chunk_size], cache=cache)[0]
        mx.eval(logits, [c.state for c in cache])
        yield logits


def fill_cache(
    model: nn.Module, tokens: mx.array | list[int], cache: list[Any],
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE, progress: Callable[[int, int], None] | None = None,
) -> None:
    """Feed ``tokens`` into ``cache`` ``prefill_step_size`` at a time, computing no logits.

    MLX is lazy: evaluating only the caches' state runs each layer as far as its keys and
    values (and H2O's scores) and never the output projection, so no [chunk, vocab] array
    is ever allocated, nor the last layer's attention and MLP."""
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
    tokens = _as_tokens(tokens)
    for start in range(0, tokens.size, prefill_step_size):
        model(tokens[None, start : start + prefill_step_size], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(start + prefill_step_size, tokens.size), tokens.size)


def prefill(
    model: nn.Module, tokens: mx.array | list[int], cache: list[Any],
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE, progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Process a prompt into ``cache``; return the logits of its last token ([vocab], evaluated).

    As mlx-lm's generate does: every token but the last fills the cache in steps of
    ``prefill_step_size`` (no logits), then the last token runs alone and only its logits
    are computed."""
    tokens = _as_tokens(tokens)
    if tokens.size == 0:
        raise ValueError("empty prompt")
    fill_cache(model, tokens[:-1], cache, prefill_step_size,
               None if progress is None else (lambda done, _: progress(done, tokens.size)))
    logits = model(tokens[None, -1:], cache=cache)[0, -1]
    mx.eval(logits, [c.state for c in cache])
    if progress is not None:
        progress(tokens.size, tokens.size)
    return logits
