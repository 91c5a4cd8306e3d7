"""KVConfig: what the user asked of a KV cache, as one value: its precision and its retention.

The fields are flat so that ``KVConfig(bits=4, max_kv=4096)`` reads like mlx-lm's flags
(``--kv-bits``, ``--kv-group-size``, ``--max-kv-size``, ``--quantized-kv-start``); the two
concerns are the ``precision`` and ``retention`` views, which the stores and the policies take.
Nothing is rewritten after construction: derived values are properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mlxkv.config.precision import DEFAULT_WINDOW_BITS, SAME_BITS, Precision, Stage
from mlxkv.config.retention import DEFAULT_RESIDUAL, DEFAULT_SINKS, Retention
from mlxkv.errors import UserError

BACKENDS = ("mlxkv", "mlx-lm")
PRECISION_FIELDS = tuple(f.name for f in dataclasses.fields(Precision))
RETENTION_FIELDS = tuple(f.name for f in dataclasses.fields(Retention))


@dataclass(frozen=True)
class KVConfig:
    """How each attention layer's KV cache stores and keeps tokens.

    Precision: ``bits`` (None: full precision; 2, 3, 4, 5, 6, 8), ``k_bits`` / ``v_bits``
    (one tensor's bits; 16 = full precision), ``group_size`` (32, 64, 128), ``mode``
    ("affine" or MLX's microscaling "mxfp4", "nvfp4", "mxfp8"), ``rotate`` (Hadamard rotation
    before quantizing, QuaRot), ``per_channel_keys`` (KIVI), ``layer_bits`` (((layer, bits),
    ...), negative layers count from the end), ``adaptive`` (((tokens, bits), ...): full
    precision, then each step's bits as the context grows), ``quantized_kv_start``.

    Retention: ``max_kv`` (None: keep every token), ``sinks`` (first tokens never evicted and
    kept 16-bit by quantized caches), ``residual`` (newest tokens kept 16-bit; None: 32, or half
    the budget for H2O), ``evict`` ("window": StreamingLLM; "h2o": heavy hitters).

    ``window_bits``: bits of the model's own sliding-window layers (Gemma 3's local layers;
    16 = full precision; default 8 on quantized caches, measured best for the bytes,
    ``DEFAULT_WINDOW_BITS``; None or "same" = like the other layers).

    ``backend``: "mlxkv" (ours) or "mlx-lm" (mlx-lm's own caches, as a baseline).
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
    window_bits: int | None = DEFAULT_WINDOW_BITS

    def __post_init__(self) -> None:
        for name in ("layer_bits", "adaptive"):  # lists from JSON or a notebook: normalized, not changed
            object.__setattr__(self, name, tuple(tuple(pair) for pair in getattr(self, name)))
        if self.window_bits == SAME_BITS:
            object.__setattr__(self, "window_bits", None)
        self.validate()

    # -- the two concerns ------------------------------------------------------------------
    @cached_property
    def precision(self) -> Precision:
        return Precision(**{name: getattr(self, name) for name in PRECISION_FIELDS})

    @cached_property
    def retention(self) -> Retention:
        return Retention(**{name: getattr(self, name) for name in RETENTION_FIELDS})

    # -- derived -------------------------------------------------------------------------------
    @property
    def key_bits(self) -> int | None:
        """Bits of stored keys once quantized; None for full precision."""
        return self.precision.key_bits

    @property
    def value_bits(self) -> int | None:
        return self.precision.value_bits

    @property
    def quantized(self) -> bool:
        return self.precision.quantized

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.precision.stages

    @property
    def exact_sinks(self) -> int:
        """The first tokens a keep-all quantized cache holds exact (16-bit) beside its packed
        store: every later token attends to these attention sinks, and their outsized keys
        would spend a per-token group's range (4-bit KLD 0.013 -> 0.009 on the default model,
        QUALITY.md). Windows and H2O always keep their sinks exact."""
        return self.sinks if (self.quantized and self.backend == "mlxkv") else 0

    @property
    def effective_residual(self) -> int:
        """The 16-bit recent tier exists next to a packed store, or as H2O's protected recent
        window. Unset, it is DEFAULT_RESIDUAL, or for H2O half of what the sinks leave of the
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

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (JSON-ready): ``KVConfig(**config.to_dict()) == config``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def for_layer(self, layer: int, n_layers: int, sliding: bool = False) -> "KVConfig":
        """This config for one layer: ``layer_bits`` applied, and ``window_bits`` on a layer
        with the model's own sliding window (``sliding``)."""
        if not self.layer_bits and (self.window_bits is None or not sliding):
            return self.replace(window_bits=None) if self.window_bits is not None else self
        p = self.precision.for_layer(layer, n_layers, sliding)
        return self.replace(**{name: getattr(p, name) for name in PRECISION_FIELDS})

    def describe(self) -> str:
        """A short human label, e.g. '4-bit g64 per-channel K rotated res32, window 4+1020'."""
        if self.backend == "mlx-lm":
            base = "mlx-lm " + (f"{self.bits}-bit g{self.group_size}" if self.bits else "full precision")
        else:
            base = self.precision.label()
            if self.quantized and self.effective_residual:
                base += f" res{self.effective_residual}"
            if self.quantized and self.max_kv is None and self.exact_sinks != DEFAULT_SINKS:
                base += f" {self.exact_sinks} exact sinks"  # the default is left unsaid
        if self.max_kv is not None and self.evict == "h2o":
            heavy = self.max_kv - self.sinks - self.effective_residual
            base += f", h2o {self.max_kv} = {self.sinks} sinks + {heavy} heavy hitters + {self.effective_residual} recent"
        elif self.max_kv is not None:
            base += f", window {self.sinks}+{self.max_kv - self.sinks}"
        if self.quantized and self.backend == "mlxkv" and self.window_bits != DEFAULT_WINDOW_BITS:
            same = self.window_bits is None
            base += "; the model's window layers " + ("like the others" if same else f"{self.window_bits}-bit")
        return base

    # -- checks -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError for combinations no cache can hold."""
        if self.backend not in BACKENDS:
            raise UserError(f"unknown KV backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        self.precision.validate()
        self.retention.validate()
        if self.evict == "h2o":
            self._validate_h2o()
        if self.max_kv is not None and self.effective_residual >= self.max_kv - self.sinks:
            raise UserError(
                f"residual={self.effective_residual} must be smaller than the window's recent part "
                f"(max_kv - sinks = {self.max_kv - self.sinks}); raise max_kv or lower residual"
            )
        if self.backend == "mlx-lm":
            self._validate_mlx_lm()

    def _validate_mlx_lm(self) -> None:
        if self.per_channel_keys or self.rotate or self.mode != "affine" or self.layer_bits or self.adaptive:
            raise UserError("mlx-lm's QuantizedKVCache has none of rotation, per-channel keys, "
                            "microscaling, per-layer or adaptive bits; use an mlxkv config")
        if self.k_bits is not None or self.v_bits is not None:
            raise UserError("mlx-lm's QuantizedKVCache uses one bit width for keys and values")
        if self.bits is not None and self.max_kv is not None:
            raise UserError("mlx-lm's QuantizedKVCache cannot hold a window; use an mlxkv config for a quantized window")

    def _validate_h2o(self) -> None:
        if self.backend == "mlx-lm":
            raise UserError("mlx-lm's caches cannot evict heavy hitters; use an mlxkv config for evict=h2o")
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

    # -- names (the registry lives in mlxkv.schemes) -------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "KVConfig":
        """A named configuration (see ``names()``) or a spec string such as "q4:residual=64",
        with field overrides."""
        from mlxkv.config.spec import parse_spec

        return parse_spec(name, **overrides)

    @classmethod
    def names(cls) -> list[str]:
        """Every named configuration, mlx-lm's baselines included."""
        from mlxkv.schemes import SCHEMES

        return list(SCHEMES)
