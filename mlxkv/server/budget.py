"""How much memory a server's KV caches may take: the active sequences' budget and the prefix cache's.

By default both come out of this machine's recommended working set (the planner's budget:
Metal's on a Mac, what the OS can hand out elsewhere) less the weights: a tenth for the
prefix cache, the rest for the sequences being decoded. Either can be set instead
(``--kv-memory``, ``--prompt-cache-bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from mlxkv.errors import UserError
from mlxkv.units import format_bytes, parse_bytes

PREFIX_SHARE = 0.1
"""Of the memory left after the weights, the prefix cache's share when neither size is given."""


@dataclass(frozen=True)
class Budgets:
    kv: int  # bytes the active sequences' caches may reserve
    prefix: int  # bytes of finished conversations' caches kept for reuse
    note: str  # where the numbers came from, for a person


def server_budgets(model: nn.Module, kv_memory: str | int | None = None,
                   prompt_cache: str | int | None = None) -> Budgets:
    """The budgets for ``model``: what was asked, or what the working set leaves after the weights."""
    from mlxkv.memory.machine_memory import device_memory
    from mlxkv.memory.tracker import model_weights_bytes

    kv = _bytes(kv_memory, "--kv-memory")
    prefix = _bytes(prompt_cache, "--prompt-cache-bytes")
    if kv is not None and prefix is not None:
        return Budgets(kv, prefix, f"KV budget {format_bytes(kv)} (--kv-memory), prefix cache {format_bytes(prefix)}")
    memory = device_memory()
    weights = model_weights_bytes(model)
    left = memory.recommended - weights
    if prefix is None:
        prefix = int(max(left, 0) * PREFIX_SHARE) if kv is None else max(min(left - kv, int(left * PREFIX_SHARE)), 0)
    if kv is None:
        kv = left - prefix
        if kv <= 0:
            raise UserError(f"the weights ({format_bytes(weights)}) leave no room for KV caches in this machine's "
                            f"working set ({format_bytes(memory.recommended)}, {memory.source}); pass --kv-memory SIZE")
        how = (f"KV budget {format_bytes(kv)}: the working set {format_bytes(memory.recommended)} ({memory.source}) "
               f"less the weights {format_bytes(weights)} and the prefix cache {format_bytes(prefix)}; "
               "set it with --kv-memory")
    else:
        how = f"KV budget {format_bytes(kv)} (--kv-memory), prefix cache {format_bytes(prefix)}"
    return Budgets(kv, prefix, how)


def _bytes(size: str | int | None, what: str) -> int | None:
    if size is None or (isinstance(size, int) and size == 0):
        return size
    return parse_bytes(size, what)
