"""PrefixCache: the KV caches of finished conversations, kept to serve the next turn.

A chat client sends the whole conversation every time; the cache of the previous answer
already holds all of it but the new message. Entries are whole per-layer cache lists with
the tokens they hold, least recently used first out when the byte budget is exceeded. An
entry is taken (not copied) by the request that reuses it and comes back longer when that
request finishes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlxkv.engine.session import common_prefix


@dataclass
class Entry:
    tokens: list[int]
    cache: list[Any]
    nbytes: int


class PrefixCache:
    """At most ``max_bytes`` of caches; ``min_tokens``: shorter shared prefixes are not worth a reuse."""

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def take(self, prompt: Sequence[int]) -> Entry | None:
        """The entry sharing the longest prefix with ``prompt`` (removed from the cache), or None."""
        best, best_len = None, self.min_tokens - 1
        for key, entry in self.entries.items():
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        return self.entries.pop(best)

    def put(self, tokens: Sequence[int], cache: list[Any]) -> None:
        if self.max_bytes <= 0:
            return
        size = sum(int(getattr(c, "nbytes", 0) or 0) for c in cache)
        if size > self.max_bytes:
            return
        self.entries[self._next] = Entry(list(tokens), cache, size)
        self._next += 1
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
