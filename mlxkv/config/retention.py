"""Retention: which tokens a KV cache keeps (all, a window with attention sinks, or H2O's choice).

Nothing here knows how tokens are encoded: that is ``Precision``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxkv.errors import UserError

EVICTIONS = ("window", "h2o")
DEFAULT_SINKS = 4
"""First tokens (attention sinks) a window never evicts and a quantized cache keeps in 16-bit."""
DEFAULT_RESIDUAL = 32
"""Recent tokens kept in 16-bit beside the packed store. Measured on SmolLM2-135M (1,024 tokens,
16-token chunks, 4-bit g64, exact sinks): KL divergence 0.032 with none, 0.0093 with 32; it
costs 32 x 16 bits per channel, bounded whatever the context (QUALITY.md)."""


@dataclass(frozen=True)
class Retention:
    """max_kv: None keeps every token, else a budget of that many tokens. sinks: the first
    tokens, never evicted. residual: the newest tokens kept in 16-bit (None: the default for
    the cache, see ``KVConfig.effective_residual``). evict: what a budget keeps: "window"
    (sinks + most recent, StreamingLLM) or "h2o" (sinks + recent + heavy hitters)."""

    max_kv: int | None = None
    sinks: int = DEFAULT_SINKS
    residual: int | None = None
    evict: str = "window"

    @property
    def bounded(self) -> bool:
        return self.max_kv is not None

    def validate(self) -> None:
        if self.evict not in EVICTIONS:
            raise UserError(f"unknown eviction {self.evict!r}; use one of {', '.join(EVICTIONS)}")
        for name in ("sinks", "residual"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.evict == "h2o" and self.max_kv is None:
            raise UserError("evict=h2o needs a token budget: set max_kv (--max-kv)")
        if self.max_kv is None:
            return
        if self.max_kv <= 0:
            raise UserError(f"max_kv must be a positive number of tokens, got {self.max_kv}")
        if self.sinks >= self.max_kv:
            raise UserError(
                f"the window (max_kv={self.max_kv}) must be larger than the sinks ({self.sinks}); "
                "raise max_kv or lower sinks"
            )
