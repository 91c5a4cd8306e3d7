"""The sequences an engine decodes, and how one step runs them: batched or one by one.

``BatchedRows`` keeps one ``BatchCache`` per layer, so a step is one forward pass of shape
[B, 1] over packed caches. ``SeparateRows`` keeps each sequence's own caches and runs a
forward per sequence: for what cannot share a batch (mlx-lm's own caches, the baselines;
precision that changes with the context; layers that are not attention).
"""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from mlxkv.caches.batch import BatchCache, batchable
from mlxkv.caches.cache import ComposedCache


class Rows(Protocol):
    """The active sequences' caches, in row order. ``shares_slots``: every row takes the
    widest row's store slots (one tensor for the batch), so memory is rows x the widest."""

    shares_slots: bool

    def __len__(self) -> int: ...
    def add(self, cache: list[Any]) -> None: ...
    def remove(self, rows: list[int]) -> list[list[Any]]: ...
    def forward(self, model: nn.Module, tokens: list[int]) -> mx.array: ...
    @property
    def nbytes(self) -> int: ...


def rows_for(cache: list[Any]) -> Rows:
    """Batched rows when every layer's cache can share a batch, else separate ones."""
    if all(isinstance(c, ComposedCache) for c in cache) and all(batchable(c.config) is None for c in cache):
        return BatchedRows()
    return SeparateRows()


class BatchedRows:
    """One BatchCache per layer; a row joins after its prefill and leaves as a single cache."""

    shares_slots = True

    def __init__(self) -> None:
        self.layers: list[BatchCache] | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, cache: list[Any]) -> None:
        joined = [BatchCache.merge([c]) for c in cache]
        if self.layers is None:
            self.layers = joined
        else:
            for mine, theirs in zip(self.layers, joined):
                mine.extend(theirs)
        self.count += 1

    def remove(self, rows: list[int]) -> list[list[Any]]:
        """Take ``rows`` out; their caches come back as single caches (for a prefix cache)."""
        if not rows:
            return []
        taken = [[layer.extract(r) for layer in self.layers] for r in rows]
        keep = [i for i in range(self.count) if i not in set(rows)]
        if keep:
            for layer in self.layers:
                layer.filter(keep)
        else:
            self.layers = None
        self.count = len(keep)
        return taken

    def forward(self, model: nn.Module, tokens: list[int]) -> mx.array:
        return model(mx.array(tokens, dtype=mx.int32)[:, None], cache=self.layers)[:, -1]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers) if self.layers else 0


class SeparateRows:
    """Each sequence's own caches, a forward pass each."""

    shares_slots = False

    def __init__(self) -> None:
        self.caches: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self.caches)

    def add(self, cache: list[Any]) -> None:
        self.caches.append(cache)

    def remove(self, rows: list[int]) -> list[list[Any]]:
        taken = [self.caches[r] for r in rows]
        self.caches = [c for i, c in enumerate(self.caches) if i not in set(rows)]
        return taken

    def forward(self, model: nn.Module, tokens: list[int]) -> mx.array:
        return mx.concatenate([model(mx.array([[t]]), cache=c)[:, -1] for t, c in zip(tokens, self.caches)])

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(c, "nbytes", 0) or 0) for cache in self.caches for c in cache)
