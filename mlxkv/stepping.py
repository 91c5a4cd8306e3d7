"""Running a model over tokens with a cache, in chunks: shared by generate, bench and eval."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def forward_chunks(
    model: nn.Module, tokens: mx.array | list[int], cache: list[Any], chunk_size: int
) -> Iterator[mx.array]:
    """Feed ``tokens`` through ``model`` ``chunk_size`` at a time, yielding each chunk's logits
    ([chunk, vocab], evaluated). Small chunks make quantized history shape attention the way
    generation does; large ones are prefill."""
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    for start in range(0, tokens.size, chunk_size):
        logits = model(tokens[None, start : start + chunk_size], cache=cache)[0]
        mx.eval(logits, [c.state for c in cache])
        yield logits


def prefill(model: nn.Module, tokens: mx.array | list[int], cache: list[Any], chunk_size: int = 512) -> mx.array:
    """Process a prompt into ``cache``; return the logits of its last token."""
    logits = None
    for logits in forward_chunks(model, tokens, cache, chunk_size):
        pass
    if logits is None:
        raise ValueError("empty prompt")
    return logits[-1]
