"""What one generation did: tokens reused, prefilled and generated, time, memory."""

from __future__ import annotations

from dataclasses import dataclass

from mlxkv.memory.held import KVHeld
from mlxkv.units import format_bytes


@dataclass
class GenerationStats:
    """Filled in as generation goes, so an interrupted run still reports what it did.
    ``peak_bytes``: MLX's peak since the process started (the load included), the same figure
    whether or not a memory report is recorded."""

    prompt_tokens: int = 0  # the whole prompt
    reused_tokens: int = 0  # of it, already in the cache (prompt cache, previous turn)
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "interrupted"
    peak_bytes: int = 0
    kv: KVHeld | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time they took: the first one comes out of the prefill."""
        return max(self.generated_tokens - 1, 0) / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        """One line: prompt, generation, peak memory, and the KV cache against 16-bit."""
        reused = f" ({self.reused_tokens} reused from cache)" if self.reused_tokens else ""
        parts = [
            f"prompt: {self.prompt_tokens} tokens{reused}, {self.prefill_tps:.1f} tokens/s",
            f"generation: {self.generated_tokens} tokens, {self.decode_tps:.1f} tokens/s",
            f"peak memory: {format_bytes(self.peak_bytes)}",
        ]
        if self.kv is not None:
            parts.append(kv_line(self.kv))
        return " | ".join(parts)


def kv_line(kv: KVHeld) -> str:
    """'KV cache: 2.10 MB (0.31x of a 16-bit cache of the same tokens)', noting when the
    16-bit tiers still hold most of it (short contexts: every bit width looks alike)."""
    text = f"KV cache: {format_bytes(kv.allocated)}"
    if kv.vs_fp16 is not None:
        text += f" ({kv.vs_fp16:.2f}x of a 16-bit cache of the same tokens)"
    if kv.mostly_tiers:
        text += "; most of it is the 16-bit sink and recent tiers, so short contexts do not show the packed size"
    return text
