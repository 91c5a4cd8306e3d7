"""Capacity: how many conversations of a given length a server admits at once under a KV budget.

Counted with the engine's own admission rule (``Engine.admits``:
the planner's bytes of the caches' own book), by offering it identical sequences until it
refuses one; nothing is prefilled. The weights' dtype matters: on a CPU mlxkv runs float32,
so its "16-bit" cache holds float32; on a Mac it holds float16. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxkv.config import KVConfig

LIMIT = 1_000_000


@dataclass(frozen=True)
class Capacity:
    config: str
    describe: str
    dtype: str
    tokens: int  # per conversation: prompt + max_tokens
    budget: int
    reserved_per_session: int
    sessions: int


def sessions_admitted(engine: Any, tokens: int) -> int:
    """Sequences of ``tokens`` tokens the engine admits together under its budget (batch size aside)."""
    return engine.admits(tokens, LIMIT)


def capacities(model: Any, tokenizer: Any, configs: dict[str, KVConfig], tokens: int, budget: int,
               dtype: str) -> list[Capacity]:
    from mlxkv.engine import Engine

    out = []
    for label, config in configs.items():
        engine = Engine(model, tokenizer, config, kv_budget=budget, max_batch=LIMIT)
        out.append(Capacity(label, config.describe(), dtype, tokens, budget, engine.reservation(tokens),
                            sessions_admitted(engine, tokens)))
    return out
