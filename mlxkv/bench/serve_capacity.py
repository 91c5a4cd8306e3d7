"""Capacity: how many conversations of a given length a server admits at once under a KV budget.

Counted with the engine's own admission rule (``Engine._fits`` on ``Engine.reservation``:
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
    """Sequences of ``tokens`` tokens the engine admits together under its budget (batch size
    aside). An adapter on the engine's private rule until it has a public one."""
    need = engine.reservation(tokens)
    if engine.kv_budget is not None and need > engine.kv_budget:
        return 0
    active, reserved = engine.active, engine.reserved
    try:
        engine.active, engine.reserved = [], []
        while len(engine.active) < LIMIT and (not engine.active or engine._fits(need)):
            engine.active.append(None)
            engine.reserved.append(need)
        return len(engine.active)
    finally:
        engine.active, engine.reserved = active, reserved


def capacities(model: Any, tokenizer: Any, configs: dict[str, KVConfig], tokens: int, budget: int,
               dtype: str) -> list[Capacity]:
    from mlxkv.engine import Engine

    out = []
    for label, config in configs.items():
        engine = Engine(model, tokenizer, config, kv_budget=budget, max_batch=LIMIT)
        out.append(Capacity(label, config.describe(), dtype, tokens, budget, engine.reservation(tokens),
                            sessions_admitted(engine, tokens)))
    return out
