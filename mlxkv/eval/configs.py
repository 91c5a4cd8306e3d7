"""The caches an evaluation compares: named specs ("q4:residual=64"), KVConfigs, or any
factory (a test's deliberately broken cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlxkv.caches.factory import make_kv_cache
from mlxkv.config import KVConfig, parse_spec
from mlxkv.errors import UserError

DEFAULT_REFERENCE = "mlxlm-fp16"
"""The full-precision reference: the model's own mlx-lm cache, independent of mlxkv's code
(on a CPU device it holds float32; on a Mac the model's float16)."""


@dataclass(frozen=True)
class CacheSpec:
    """One row of an evaluation: a label and how to build fresh per-layer caches."""

    label: str
    make: Callable[[nn.Module], list[Any]]
    config: KVConfig | None = None

    @property
    def description(self) -> str:
        return self.config.describe() if self.config is not None else self.label


def as_spec(item: str | KVConfig | CacheSpec) -> CacheSpec:
    """A CacheSpec from a spec string (see ``parse_spec``), a KVConfig or a CacheSpec."""
    if isinstance(item, CacheSpec):
        return item
    if isinstance(item, KVConfig):
        config, label = item, item.describe()
    else:
        label = item.strip()
        config = parse_spec(label)
    return CacheSpec(label, lambda model, c=config: make_kv_cache(model, c), config)


def parse_specs(items: str | Sequence[str | KVConfig | CacheSpec]) -> list[CacheSpec]:
    """Specs from a comma-separated string or a list; duplicates dropped, order kept."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    specs: dict[str, CacheSpec] = {}
    for item in items:
        spec = as_spec(item)
        specs.setdefault(spec.label, spec)
    if not specs:
        raise UserError(f"no KV configs given; choose from {', '.join(KVConfig.names())}")
    return list(specs.values())
