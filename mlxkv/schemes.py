"""The registry of named KV schemes: each one's fields, what it is, and what it measured.

This is the one table every command reads: ``--kv-config NAME`` and spec strings resolve
names here, ``--kv-bits N`` takes the best measured scheme at N bits, the planner ranks
schemes by measured quality, ``--kv-bits auto`` takes the best measured one that fits, and
every ``--help`` lists them from here. Quality numbers are data copied from the run that
produced them (QUALITY.md), with that run's command; re-measure, then edit them here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mlxkv.errors import UserError

EVERY_SCHEME = (
    "mlxkv eval kld --tokens 1024 --chunk 16 --configs fp16,q8,mxfp8,k8v4,q6,q5,q4,q4-nores,q4-rot,q4-kivi,"
    "q4-kivi-rot,mxfp4,mxfp4-rot,nvfp4,k4v3-rot,q3,k4v2,k3v2-kivi-rot,k3v2-kivi-rot:sinks=0,q2,mlxlm-q8,"
    "mlxlm-q4,mlxlm-q2"
)
"""QUALITY.md, 'Every scheme': SmolLM2-135M-Instruct Q4_1, 1,024 tokens of the bundled text, chunks of 16."""

KIVI_ROT_SWEEP = (
    "mlxkv eval kld --tokens 1024 --chunk 16 --configs q8,q8:per_channel_keys=1:rotate=1,q6,"
    "q6:per_channel_keys=1:rotate=1,q5,q5:per_channel_keys=1:rotate=1,q3,q3:rotate=1,q3:per_channel_keys=1,"
    "q3:per_channel_keys=1:rotate=1,q2:per_channel_keys=1:rotate=1"
)
"""QUALITY.md, 'Per-channel keys and rotation at every bit width' (the same model, text and chunks)."""


@dataclass(frozen=True)
class Measured:
    """One quality measurement: mean KL divergence from the full-precision cache (nats) and
    the bits per element the cache held, 16-bit tiers included, on ``model`` over ``tokens``."""

    kld: float
    bits: float
    command: str = EVERY_SCHEME
    model: str = "SmolLM2-135M-Instruct Q4_1"
    tokens: int = 1024


@dataclass(frozen=True)
class Scheme:
    name: str
    fields: Mapping[str, Any]
    summary: str
    measured: Measured | None = None
    baseline: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "baseline", self.fields.get("backend") == "mlx-lm")

    def config(self, **overrides: Any):
        from mlxkv.config import KVConfig

        return KVConfig(**{**self.fields, **overrides})

    def help_line(self) -> str:
        quality = f" [KLD {self.measured.kld:.2g} at {self.measured.bits:.2f} bits]" if self.measured else ""
        return f"{self.summary}{quality}"


def _schemes(*items: Scheme) -> Mapping[str, Scheme]:
    return MappingProxyType({s.name: s for s in items})


SCHEMES: Mapping[str, Scheme] = _schemes(
    Scheme("fp16", {}, "full precision (the model's dtype; float32 on a CPU device)", Measured(0.0, 16.0)),
    Scheme("q8", {"bits": 8}, "8-bit keys and values, group 64, 16-bit residual window", Measured(2.75e-5, 8.764)),
    Scheme("q6", {"bits": 6}, "6-bit keys and values, group 64", Measured(4.51e-4, 6.834)),
    Scheme("q5", {"bits": 5}, "5-bit keys and values, group 64", Measured(1.989e-3, 5.869)),
    Scheme("q4", {"bits": 4}, "4-bit keys and values, group 64", Measured(9.319e-3, 4.904)),
    Scheme("q3", {"bits": 3}, "3-bit keys and values, group 64", Measured(6.422e-2, 3.939)),
    Scheme("q2", {"bits": 2}, "2-bit keys and values, group 64 (unusable on small models)", Measured(0.8699, 2.975)),
    Scheme("k8v4", {"k_bits": 8, "v_bits": 4}, "8-bit keys, 4-bit values (keys are the sensitive half)",
           Measured(6.05e-4, 6.834)),
    Scheme("q4-rot", {"bits": 4, "rotate": True}, "4-bit, Hadamard-rotated keys and values", Measured(4.684e-3, 4.904)),
    Scheme("q4-kivi", {"bits": 4, "per_channel_keys": True}, "4-bit, keys per channel (KIVI), values per token",
           Measured(2.105e-3, 5.219)),
    Scheme("q4-kivi-rot", {"bits": 4, "per_channel_keys": True, "rotate": True},
           "4-bit, per-channel keys, rotated", Measured(1.51e-3, 5.219)),
    Scheme("q8-kivi-rot", {"bits": 8, "per_channel_keys": True, "rotate": True},
           "8-bit, per-channel keys, rotated", Measured(5.15e-6, 8.969, KIVI_ROT_SWEEP)),
    Scheme("q6-kivi-rot", {"bits": 6, "per_channel_keys": True, "rotate": True},
           "6-bit, per-channel keys, rotated", Measured(8.24e-5, 7.094, KIVI_ROT_SWEEP)),
    Scheme("q5-kivi-rot", {"bits": 5, "per_channel_keys": True, "rotate": True},
           "5-bit, per-channel keys, rotated", Measured(2.99e-4, 6.156, KIVI_ROT_SWEEP)),
    Scheme("q3-kivi-rot", {"bits": 3, "per_channel_keys": True, "rotate": True},
           "3-bit, per-channel keys, rotated", Measured(8.22e-3, 4.281, KIVI_ROT_SWEEP)),
    Scheme("q3-rot", {"bits": 3, "rotate": True}, "3-bit, Hadamard-rotated", Measured(2.196e-2, 3.939, KIVI_ROT_SWEEP)),
    Scheme("q2-kivi-rot", {"bits": 2, "per_channel_keys": True, "rotate": True},
           "2-bit, per-channel keys, rotated", Measured(5.905e-2, 3.344, KIVI_ROT_SWEEP)),
    Scheme("k4v3-rot", {"k_bits": 4, "v_bits": 3, "rotate": True}, "4-bit keys, 3-bit values, rotated",
           Measured(5.92e-3, 4.422)),
    Scheme("k3v2-kivi-rot", {"k_bits": 3, "v_bits": 2, "per_channel_keys": True, "rotate": True, "residual": 0},
           "3-bit per-channel keys, 2-bit values, rotated, no residual window", Measured(2.072e-2, 3.812)),
    Scheme("k4v2", {"k_bits": 4, "v_bits": 2}, "4-bit keys, 2-bit values", Measured(2.65e-2, 3.939)),
    Scheme("mxfp8", {"mode": "mxfp8"}, "MLX microscaling fp8 (e4m3, 8-bit shared exponent per 32)",
           Measured(7.14e-4, 8.522)),
    Scheme("mxfp4", {"mode": "mxfp4"}, "MLX microscaling fp4 (e2m1, 8-bit shared exponent per 32)",
           Measured(2.488e-2, 4.663)),
    Scheme("mxfp4-rot", {"mode": "mxfp4", "rotate": True}, "mxfp4 with Hadamard rotation", Measured(8.142e-3, 4.663)),
    Scheme("nvfp4", {"mode": "nvfp4"}, "NVIDIA-style fp4 (fp8 scale per 16)", Measured(9.954e-3, 4.904)),
    Scheme("adaptive", {"adaptive": ((1024, 8), (4096, 4))}, "full precision to 1K tokens, 8-bit to 4K, then 4-bit"),
    Scheme("q8-nores", {"bits": 8, "residual": 0}, "8-bit, every token but the sinks packed (no residual window)"),
    Scheme("q4-nores", {"bits": 4, "residual": 0}, "4-bit, every token but the sinks packed (no residual window)",
           Measured(3.189e-2, 4.545)),
    Scheme("mlxlm-fp16", {"backend": "mlx-lm"}, "baseline: mlx-lm's KVCache"),
    Scheme("mlxlm-q8", {"backend": "mlx-lm", "bits": 8}, "baseline: mlx-lm's QuantizedKVCache, 8-bit g64",
           Measured(4.38e-4, 9.0)),
    Scheme("mlxlm-q4", {"backend": "mlx-lm", "bits": 4}, "baseline: mlx-lm's QuantizedKVCache, 4-bit g64",
           Measured(0.1278, 5.0)),
    Scheme("mlxlm-q2", {"backend": "mlx-lm", "bits": 2}, "baseline: mlx-lm's QuantizedKVCache, 2-bit g64",
           Measured(3.349, 3.0)),
)


def scheme(name: str) -> Scheme:
    key = name.strip().lower()
    if key not in SCHEMES:
        raise UserError(f"unknown KV config {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[key]


def ranked(names: Iterable[str] | None = None) -> list[Scheme]:
    """Our schemes from best to worst measured quality (lowest KL divergence first); schemes
    without a measurement come after, most bits first. Baselines are never ranked."""
    pool = [SCHEMES[n] for n in (names if names is not None else SCHEMES) if n in SCHEMES]
    pool = [s for s in pool if not s.baseline]
    measured = sorted((s for s in pool if s.measured), key=lambda s: s.measured.kld)
    rest = sorted((s for s in pool if not s.measured), key=lambda s: -(s.config().key_bits or 16))
    return measured + rest


def quality_rank(label: str) -> tuple[int, float]:
    """A sort key for any config label: registry schemes by measured KLD, others after."""
    s = SCHEMES.get(label.strip().lower())
    if s is None or s.measured is None or s.baseline:
        return (1, 0.0)
    return (0, s.measured.kld)


def identity(config: Any) -> tuple:
    """What makes a scheme that scheme, for carrying its measurement over to a user's variant:
    the bits, format, rotation and key axis (not group size, per-layer bits or retention)."""
    return (config.key_bits, config.value_bits, config.mode, config.rotate, config.per_channel_keys,
            bool(config.adaptive), config.backend)


def best_at_bits(bits: int, usable: Callable[[Any], bool] = lambda config: True, **overrides: Any):
    """``--kv-bits N``: the best measured scheme that stores keys and values at ``bits``, with
    the user's other settings (``overrides``) applied where they do not change the scheme and
    the model can hold it (``usable``). On the default model at 4 bits that is ``q4-kivi-rot``
    (KLD 0.0015 against plain 4-bit's 0.0093); the plain affine cache when none qualifies."""
    from mlxkv.config import KVConfig

    for s in ranked():
        plain = s.config()
        if plain.key_bits != bits or plain.value_bits != bits:
            continue
        try:
            candidate = s.config(**overrides)
        except UserError:  # the user's settings rule this scheme out (e.g. H2O with per-channel keys)
            continue
        if identity(candidate) == identity(plain) and usable(candidate):
            return candidate
    return KVConfig(**{"bits": bits, **overrides})


def help_table() -> str:
    """Every scheme, one line each, for ``--help`` epilogs."""
    return "\n".join(f"  {name:<14} {s.help_line()}" for name, s in SCHEMES.items())
