"""KVConfig: what a KV cache stores (precision) and what it keeps (policy), as one value.

The fields mirror mlx-lm's flags where they overlap (``--kv-bits``, ``--kv-group-size``,
``--max-kv-size``, ``--quantized-kv-start``) so users can move between the two tools.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mlxkv.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
BACKENDS = ("mlxkv", "mlx-lm")
MICROSCALING = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
"""MLX's microscaling formats: (bits, group size). Each group shares one 8-bit scale."""
MODES = ("affine", *MICROSCALING)
EVICTIONS = ("window", "h2o")
HADAMARD_BASES = (1, 12, 20, 28)
"""mx.hadamard_transform sizes: m * 2^k for these m."""

DEFAULT_SINKS = 4
"""First tokens (attention sinks) a window never evicts and a quantized cache keeps in 16-bit."""

DEFAULT_RESIDUAL = 32
"""Recent tokens kept in 16-bit floats beside the packed store. Measured on SmolLM2-135M
(1,024 tokens, 16-token chunks, 4-bit g64, exact sinks): KL divergence 0.032 with none, 0.0093
with 32; it costs 32 x 16 bits per channel, bounded whatever the context (QUALITY.md)."""


@dataclass(frozen=True)
class KVConfig:
    """How each attention layer's KV cache stores and keeps tokens.

    bits: None keeps full precision (the model's dtype); else affine bits per element.
    k_bits / v_bits: override ``bits`` for keys or values alone (K8V4 = k_bits=8, v_bits=4);
        0 forces full precision for that tensor.
    group_size: elements sharing one scale and bias (2 x 16 bits per group).
    max_kv: None keeps every token; else a budget of ``max_kv`` tokens: the first ``sinks``
        tokens plus the most recent ones (StreamingLLM), or as ``evict`` says.
    sinks: the first tokens, which every later token attends to (attention sinks): never
        evicted from a window, and kept exact (16-bit) by every quantized cache.
    quantized_kv_start: stay full precision until the cache holds this many tokens.
    residual: the most recent tokens kept in 16-bit beside the packed store (quantized
        configs only), flushed into the packed store as newer tokens arrive. None (unset):
        DEFAULT_RESIDUAL (32), or with evict="h2o" half the budget the sinks leave.
    per_channel_keys: quantize keys per channel over groups of ``group_size`` tokens (KIVI)
        instead of per token; the residual tier also holds the incomplete group.
    rotate: an orthonormal Hadamard rotation of keys and queries (scores unchanged) and of
        values (undone on the attention output) before quantizing: spreads outlier
        channels over the whole group (QuaRot).
    mode: "affine" (``mx.quantize`` with scale and bias per group) or one of MLX's
        microscaling formats "mxfp4", "nvfp4", "mxfp8" (bits and group size implied).
    layer_bits: ((layer, bits), ...) per-layer overrides of ``bits`` (negative layers count
        from the end; bits 0 = full precision), e.g. ((0, 8), (-1, 8)).
    adaptive: ((tokens, bits), ...) context-adaptive precision: full precision until the
        cache holds the first step's tokens, then each step's bits, converted in place,
        e.g. ((1024, 8), (4096, 4)). ``bits`` becomes the last step's.
    backend: "mlxkv" (ours) or "mlx-lm" (mlx-lm's own caches, as a baseline).
    evict: what a ``max_kv`` budget keeps. "window": the sinks plus the most recent tokens
        (StreamingLLM). "h2o": the sinks, the newest ``residual`` tokens (16-bit, even for
        full-precision configs; by default half the budget) and the older tokens with the
        highest accumulated attention (heavy hitters, H2O), ``max_kv`` tokens in all.
    """

    bits: int | None = None
    group_size: int = 64
    k_bits: int | None = None
    v_bits: int | None = None
    max_kv: int | None = None
    sinks: int = DEFAULT_SINKS
    quantized_kv_start: int = 0
    residual: int | None = None
    per_channel_keys: bool = False
    rotate: bool = False
    mode: str = "affine"
    layer_bits: tuple[tuple[int, int], ...] = ()
    adaptive: tuple[tuple[int, int], ...] = ()
    backend: str = "mlxkv"
    evict: str = "window"

    def __post_init__(self) -> None:
        if self.mode in MICROSCALING:  # the format fixes bits and group size
            bits, group = MICROSCALING[self.mode]
            if self.bits not in (None, bits) or self.k_bits is not None or self.v_bits is not None:
                raise UserError(f"{self.mode} is {bits}-bit for keys and values; drop the bits settings")
            object.__setattr__(self, "bits", bits)
            object.__setattr__(self, "group_size", group)
        object.__setattr__(self, "layer_bits", tuple(tuple(pair) for pair in self.layer_bits))
        object.__setattr__(self, "adaptive", tuple(tuple(pair) for pair in self.adaptive))
        if self.adaptive:
            last = self.adaptive[-1][1]
            if self.bits not in (None, last) or self.k_bits is not None or self.v_bits is not None:
                raise UserError("with adaptive precision the steps set the bits; drop the other bits settings")
            if self.quantized_kv_start:
                raise UserError("adaptive precision replaces quantized_kv_start; give the first step's token count instead")
            object.__setattr__(self, "bits", last)
        self.validate()

    @property
    def precision_steps(self) -> tuple[tuple[int, int | None, int | None], ...]:
        """(from token, key bits, value bits) stages, full precision before the first."""
        if self.adaptive:
            return tuple((tokens, bits, bits) for tokens, bits in self.adaptive)
        return ((self.quantized_kv_start, self.key_bits, self.value_bits),)

    # -- derived -------------------------------------------------------------
    @property
    def key_bits(self) -> int | None:
        """Bits for keys, None for full precision."""
        return _resolve(self.k_bits, self.bits)

    @property
    def value_bits(self) -> int | None:
        """Bits for values, None for full precision."""
        return _resolve(self.v_bits, self.bits)

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None or self.value_bits is not None

    @property
    def exact_sinks(self) -> int:
        """The first tokens a keep-all quantized cache holds exact (16-bit) beside its packed
        store. Every later token attends to these attention sinks, and their outsized keys
        would spend a per-token group's range (4-bit KLD 0.013 -> 0.009 on the default model,
        QUALITY.md). Windows and H2O always keep their sinks exact."""
        return self.sinks if (self.quantized and self.backend == "mlxkv") else 0

    @property
    def effective_residual(self) -> int:
        """The residual only exists next to a packed store, or as the recent window H2O protects.
        Unset (None), it is DEFAULT_RESIDUAL, or for H2O half of what the sinks leave of the
        budget: with 32 recent tokens H2O loses to a plain window, with half it wins (QUALITY.md)."""
        if not ((self.quantized or self.evict == "h2o") and self.backend == "mlxkv"):
            return 0
        if self.residual is not None:
            return self.residual
        if self.evict == "h2o" and self.max_kv is not None:
            return max(1, (self.max_kv - self.sinks) // 2)
        return DEFAULT_RESIDUAL

    def replace(self, **changes: Any) -> "KVConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short human label, e.g. 'K8V4 g64 res32, window 4+1020'."""
        if self.backend == "mlx-lm":
            base = "mlx-lm " + (f"{self.bits}-bit g{self.group_size}" if self.bits else "full precision")
        elif not self.quantized:
            base = "full precision"
        else:
            kb, vb = self.key_bits, self.value_bits
            prec = f"{kb}-bit" if kb == vb else f"K{kb or 16}V{vb or 16}"
            base = f"{prec} g{self.group_size}" if self.mode == "affine" else self.mode
            if self.per_channel_keys:
                base += " per-channel K"
            if self.rotate:
                base += " rotated"
            if self.layer_bits:
                base += " layers " + ",".join(f"{layer}:{bits or 16}" for layer, bits in self.layer_bits)
            if self.effective_residual:
                base += f" res{self.effective_residual}"
            if self.quantized_kv_start:
                base += f" from token {self.quantized_kv_start}"
            if self.adaptive:
                base += " adaptive " + " -> ".join(["fp"] + [f"{b}-bit@{t}" for t, b in self.adaptive])
            if self.max_kv is None and self.exact_sinks != DEFAULT_SINKS:  # the default is left unsaid
                base += f" {self.exact_sinks} exact sinks"
        if self.max_kv is not None and self.evict == "h2o":
            heavy = self.max_kv - self.sinks - self.effective_residual
            base += f", h2o {self.max_kv} = {self.sinks} sinks + {heavy} heavy hitters + {self.effective_residual} recent"
        elif self.max_kv is not None:
            base += f", window {self.sinks}+{self.max_kv - self.sinks}"
        return base

    # -- checks --------------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError for combinations no cache can hold."""
        if self.backend not in BACKENDS:
            raise UserError(f"unknown KV backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        for name in ("bits", "k_bits", "v_bits"):
            value = getattr(self, name)
            allowed = SUPPORTED_BITS if name == "bits" else (0, *SUPPORTED_BITS)
            if value is not None and value not in allowed:
                raise UserError(
                    f"{name}={value} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}"
                    " (or leave it unset for full precision)"
                )
        if self.mode not in MODES:
            raise UserError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(MODES)}")
        for layer, bits in self.layer_bits:
            if bits not in (0, *SUPPORTED_BITS):
                raise UserError(f"layer {layer}: {bits} bits is not supported; use 0 (full precision) or one of "
                                f"{', '.join(map(str, SUPPORTED_BITS))}")
        starts = [tokens for tokens, _ in self.adaptive]
        if starts != sorted(set(starts)) or any(t < 0 for t in starts):
            raise UserError("adaptive steps need increasing token counts, e.g. ((1024, 8), (4096, 4))")
        for _, bits in self.adaptive:
            if bits not in SUPPORTED_BITS:
                raise UserError(f"adaptive step of {bits} bits is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.layer_bits and self.mode != "affine":
            raise UserError("per-layer bits work with affine quantization only")
        if self.mode == "affine" and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise UserError(
                f"group size {self.group_size} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )
        for name in ("sinks", "quantized_kv_start", "residual"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.evict not in EVICTIONS:
            raise UserError(f"unknown eviction {self.evict!r}; use one of {', '.join(EVICTIONS)}")
        if self.evict == "h2o":
            self._validate_h2o()
        if self.max_kv is not None:
            if self.max_kv <= 0:
                raise UserError(f"max_kv must be a positive number of tokens, got {self.max_kv}")
            if self.sinks >= self.max_kv:
                raise UserError(
                    f"the window (max_kv={self.max_kv}) must be larger than the sinks ({self.sinks}); "
                    "raise max_kv or lower sinks"
                )
            if self.effective_residual >= self.max_kv - self.sinks:
                raise UserError(
                    f"residual={self.effective_residual} must be smaller than the window's recent part "
                    f"(max_kv - sinks = {self.max_kv - self.sinks}); raise max_kv or lower residual"
                )
        if self.per_channel_keys and self.key_bits is None:
            raise UserError("per-channel keys need quantized keys; set bits or k_bits")
        if self.backend == "mlx-lm":
            if self.per_channel_keys or self.rotate or self.mode != "affine" or self.layer_bits:
                raise UserError("mlx-lm's QuantizedKVCache has none of rotation, per-channel keys, "
                                "microscaling or per-layer bits; use an mlxkv config")
            if self.per_channel_keys:
                raise UserError("mlx-lm's QuantizedKVCache quantizes keys per token only")
            if self.k_bits is not None or self.v_bits is not None:
                raise UserError("mlx-lm's QuantizedKVCache uses one bit width for keys and values")
            if self.bits is not None and self.max_kv is not None:
                raise UserError(
                    "mlx-lm's QuantizedKVCache cannot rotate; use an mlxkv config for a quantized window"
                )

    def _validate_h2o(self) -> None:
        if self.backend == "mlx-lm":
            raise UserError("mlx-lm's caches cannot evict heavy hitters; use an mlxkv config for evict=h2o")
        if self.max_kv is None:
            raise UserError("evict=h2o needs a token budget: set max_kv (--max-kv)")
        residual = self.effective_residual
        if residual < 1:
            raise UserError("evict=h2o protects the newest `residual` tokens and scores tokens there; set residual >= 1")
        if self.max_kv - self.sinks - residual < 1:
            raise UserError(
                f"evict=h2o needs room for heavy hitters: max_kv={self.max_kv} must exceed sinks + residual "
                f"({self.sinks} + {residual}); raise max_kv or lower sinks or residual"
            )
        if self.per_channel_keys:
            raise UserError("evict=h2o places single tokens, per-channel keys are written in groups of tokens; "
                            "drop per_channel_keys or use evict=window")

    def for_layer(self, layer: int, n_layers: int) -> "KVConfig":
        """This config with ``layer_bits`` applied to one layer."""
        for index, bits in self.layer_bits:
            if index % n_layers == layer:
                return self.replace(bits=bits or None, k_bits=None, v_bits=None, layer_bits=())
        return self.replace(layer_bits=()) if self.layer_bits else self

    def check_layer_bits(self, n_layers: int) -> None:
        for index, _ in self.layer_bits:
            if not -n_layers <= index < n_layers:
                raise UserError(f"layer {index} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")

    def check_head_dim(self, head_dim: int) -> None:
        """Group-wise quantization needs groups that tile the head dimension; rotation needs
        a size mx.hadamard_transform supports."""
        if self.rotate and not hadamard_size(head_dim):
            raise UserError(
                f"rotation needs head_dim = m * 2^k with m in {HADAMARD_BASES}; this model's is {head_dim}: "
                "drop the rotation"
            )
        if not self.quantized or head_dim % self.group_size == 0:
            return
        fitting = [g for g in SUPPORTED_GROUP_SIZES if head_dim % g == 0]
        hint = f"use --kv-group-size {max(fitting)}" if fitting else "this model needs a full-precision cache"
        raise UserError(
            f"group size {self.group_size} does not divide the model's head_dim {head_dim}; {hint}"
        )

    # -- names ---------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "KVConfig":
        """A named configuration (see ``names()``), with field overrides."""
        key = name.strip().lower()
        if key not in NAMED_CONFIGS:
            raise UserError(f"unknown KV config {name!r}; known: {', '.join(cls.names())}")
        fields = {**NAMED_CONFIGS[key][0], **overrides}
        return cls(**fields)

    @classmethod
    def names(cls) -> list[str]:
        """Every named configuration, baselines included."""
        return list(NAMED_CONFIGS)

    @classmethod
    def help_table(cls) -> str:
        return "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in NAMED_CONFIGS.items())


def hadamard_size(n: int) -> bool:
    """Whether mx.hadamard_transform supports vectors of n elements."""
    for m in HADAMARD_BASES:
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return True
    return False


def parse_pairs(spec: str, what: str, example: str) -> tuple[tuple[int, int], ...]:
    """'0:8,-1:8' -> ((0, 8), (-1, 8)): the syntax of --kv-bits-map and --kv-adaptive."""
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        left, sep, right = item.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(left), int(right)))
        except ValueError:
            raise UserError(f"bad {what} entry {item!r}: use pairs such as '{example}'") from None
    return tuple(pairs)


def parse_layer_bits(spec: str) -> tuple[tuple[int, int], ...]:
    """--kv-bits-map '0:8,-1:8': LAYER:BITS pairs."""
    return parse_pairs(spec, "--kv-bits-map (LAYER:BITS)", "0:8,-1:8")


def parse_adaptive(spec: str) -> tuple[tuple[int, int], ...]:
    """--kv-adaptive '1024:8,4096:4': TOKENS:BITS steps."""
    return parse_pairs(spec, "--kv-adaptive (TOKENS:BITS)", "1024:8,4096:4")


def _resolve(specific: int | None, general: int | None) -> int | None:
    if specific is None:
        return general
    return specific or None  # 0 means full precision


NAMED_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "fp16": ({}, "full-precision cache (the model's dtype; float32 on a CPU device)"),
    "q8": ({"bits": 8}, "8-bit keys and values, group 64, 16-bit residual window"),
    "q6": ({"bits": 6}, "6-bit keys and values, group 64, 16-bit residual window"),
    "q5": ({"bits": 5}, "5-bit keys and values, group 64, 16-bit residual window"),
    "q4": ({"bits": 4}, "4-bit keys and values, group 64, 16-bit residual window"),
    "q3": ({"bits": 3}, "3-bit keys and values, group 64, 16-bit residual window"),
    "q2": ({"bits": 2}, "2-bit keys and values, group 64, 16-bit residual window"),
    "k8v4": ({"k_bits": 8, "v_bits": 4}, "8-bit keys, 4-bit values (keys are the sensitive half)"),
    "q4-rot": ({"bits": 4, "rotate": True}, "4-bit, Hadamard-rotated keys and values"),
    "k4v3-rot": ({"k_bits": 4, "v_bits": 3, "rotate": True},
                 "4-bit keys, 3-bit values, rotated: 4.4 bits per element at 1K tokens, KLD 0.006 (QUALITY.md)"),
    "k3v2-kivi-rot": ({"k_bits": 3, "v_bits": 2, "per_channel_keys": True, "rotate": True, "residual": 0},
                      "3-bit per-channel keys, 2-bit values, rotated: 3.0 bits per element, KLD 0.066 (QUALITY.md)"),
    "q4-kivi": ({"bits": 4, "per_channel_keys": True}, "4-bit, keys per channel (KIVI), values per token"),
    "q4-kivi-rot": ({"bits": 4, "per_channel_keys": True, "rotate": True},
                    "4-bit, per-channel keys, rotated (what --kv-bits 4 uses): KLD 0.0015 (QUALITY.md)"),
    "mxfp4": ({"mode": "mxfp4"}, "MLX microscaling fp4 (e2m1, 8-bit shared exponent per 32)"),
    "nvfp4": ({"mode": "nvfp4"}, "NVIDIA-style fp4 (8-bit fp8 scale per 16)"),
    "mxfp8": ({"mode": "mxfp8"}, "MLX microscaling fp8 (e4m3, 8-bit shared exponent per 32)"),
    "mxfp4-rot": ({"mode": "mxfp4", "rotate": True}, "mxfp4 with Hadamard rotation"),
    "adaptive": ({"adaptive": ((1024, 8), (4096, 4))}, "full precision to 1K tokens, 8-bit to 4K, then 4-bit"),
    "k4v2": ({"k_bits": 4, "v_bits": 2}, "4-bit keys, 2-bit values"),
    "q8-nores": ({"bits": 8, "residual": 0}, "8-bit, every token but the sinks packed (no residual window)"),
    "q4-nores": ({"bits": 4, "residual": 0}, "4-bit, every token but the sinks packed (no residual window)"),
    "mlxlm-fp16": ({"backend": "mlx-lm"}, "baseline: mlx-lm's KVCache"),
    "mlxlm-q8": ({"backend": "mlx-lm", "bits": 8}, "baseline: mlx-lm's QuantizedKVCache, 8-bit g64"),
    "mlxlm-q4": ({"backend": "mlx-lm", "bits": 4}, "baseline: mlx-lm's QuantizedKVCache, 4-bit g64"),
    "mlxlm-q2": ({"backend": "mlx-lm", "bits": 2}, "baseline: mlx-lm's QuantizedKVCache, 2-bit g64"),
}


def parse_config_spec(spec: str) -> KVConfig:
    """A named config with optional field overrides: ``"q4"``, ``"q4:residual=64"``,
    ``"k8v4:group_size=32:residual=0"``. Colons separate overrides so that a comma-separated
    list of specs stays readable on a command line; ``none`` sets a field to None."""
    name, *assignments = (part.strip() for part in spec.strip().split(":"))
    fields = {f.name: f for f in dataclasses.fields(KVConfig)}
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise UserError(f"cannot read {assignment!r} in KV config {spec!r}; write FIELD=VALUE, e.g. q4:residual=64")
        if key not in fields:
            raise UserError(f"unknown KV config field {key!r} in {spec!r}; fields: {', '.join(fields)}")
        overrides[key] = _parse_field_value(fields[key], raw.strip(), spec)
    return KVConfig.from_name(name, **overrides)


def _parse_field_value(field: dataclasses.Field, raw: str, spec: str) -> Any:
    key = field.name
    if field.type == "str":  # backend, mode, evict
        return raw
    if raw.lower() == "none":
        if "None" not in str(field.type):
            raise UserError(f"{key} cannot be none in {spec!r}; give a whole number")
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{key} must be a whole number (or none) in {spec!r}, got {raw!r}") from None
