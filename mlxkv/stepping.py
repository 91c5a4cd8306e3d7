"""Running a model over tokens with a cache, in chunks: shared by generate, bench and eval."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

DEFAULT_PREFILL_STEP_SIZE = 2048
"""Prompt tokens per forward pass (mlx-lm's default prefill_step_size)."""


def forward_chunks(
    model: nn.Module, tokens: mx.array | list[int], cache: list[Any], chunk_size: int
) -> Iterator[mx.array]:
    """Feed ``tokens`` through ``model`` ``chunk_size`` at a time, yielding each chunk's logits
    ([chunk, vocab], evaluated): for callers that score every position (eval kld)."""
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    for start in range(0, tokens.size, chunk_size):
        logits = model(tokens[None, start : start + chunk_size], cache=cache)[0]
        mx.eval(logits, [c.state for c in cache])
        yield logits


def prefill(model: nn.Module, tokens: mx.array | list[int], cache: list[Any],
            prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
            progress: Callable[[int, int], None] | None = None) -> mx.array:
    """Process a prompt into ``cache`` and return the logits of its last token ([vocab]).

    Only the caches are evaluated for all but the last token, so the [chunk, vocab] logits
    of prompt tokens (100 MB per 512 tokens on a 49K vocabulary) are never computed."""
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    n = tokens.size
    if n == 0:
        raise ValueError("empty prompt")
    for start in range(0, n - 1, prefill_step_size):
        end = min(start + prefill_step_size, n - 1)
        model(tokens[None, start:end], cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(end, n)
    logits = model(tokens[None, n - 1 :], cache=cache)[0, -1]
    mx.eval(logits)
    if progress is not None:
        progress(n, n)
    return logits
