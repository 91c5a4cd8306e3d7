"""KVRequest: a KV config as a user asks for it, resolved once the model (and context) is known.

``--kv-bits 4`` means "the best measured 4-bit scheme this model can hold" and ``--kv-bits
auto`` "the best measured scheme that fits the memory", so what a command line asks for
is not yet a KVConfig. Every command, the server and the Python API resolve it here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mlxkv.config.kvconfig import KVConfig
from mlxkv.config.spec import parse_spec
from mlxkv.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class KVRequest:
    """``spec``: a name or spec string (``--kv-config``); ``bits``: ``--kv-bits`` (bits or
    "auto"); ``overrides``: every other field the user set (typed values)."""

    spec: str | None = None
    bits: int | str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType({k: v for k, v in self.overrides.items()
                                                                if v is not None}))

    @property
    def auto(self) -> bool:
        return self.bits == AUTO

    def check(self) -> KVConfig:
        """The config as far as it is known without a model: raises UserError for bad input
        before anything is loaded."""
        if self.spec is not None:
            bits = {} if self.bits in (None, AUTO) else {"bits": self.bits}
            if self.auto:
                raise UserError("--kv-bits auto chooses the configuration; drop --kv-config, or --kv-bits")
            return parse_spec(self.spec, **{**self.overrides, **bits})
        if self.bits in (None, AUTO):
            return KVConfig(**self.overrides)
        return KVConfig(bits=int(self.bits), **self.overrides)

    def resolve(self, model: Any = None, context: int | None = None, memory: int | str | None = None,
                note: Callable[[str], None] | None = None, prefill_step: int | None = None) -> KVConfig:
        """The KVConfig for ``model``: a plain ``--kv-bits N`` takes the registry's best scheme at N
        bits that the model can hold; ``auto`` the planner's best whose predicted peak (prefilling
        in steps of ``prefill_step`` tokens) fits ``context`` tokens in ``memory``; anything else
        is what was asked."""
        from mlxkv.caches.factory import model_fits
        from mlxkv.schemes import best_at_bits

        asked = self.check()
        if self.auto:
            if model is None or context is None:
                raise ValueError("--kv-bits auto needs the model and the context")
            from mlxkv.memory.planner import recommend_config

            name, reason = recommend_config(model, context, memory, prefill_step=prefill_step, **self.overrides)
            if note:
                note(f"--kv-bits auto: {reason}")
            return parse_spec(name, **self.overrides)
        if self.spec is None and self.bits is not None:
            usable = (lambda config: model_fits(config, model)) if model is not None else (lambda config: True)
            return best_at_bits(int(self.bits), usable, **self.overrides)
        return asked
