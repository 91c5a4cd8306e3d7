"""Precision: how a KV cache encodes the tokens it keeps (bits, groups, format, rotation).

Full precision (the model's dtype) is ``None`` once resolved; where a user overrides bits for
keys, values, a layer or a stage, full precision is written ``16`` (``FULL_PRECISION``), as
in "K16V4". Nothing here knows which tokens a cache keeps: that is ``Retention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from mlxkv.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
FULL_PRECISION = 16
"""How a user writes 'not quantized' where bits are overridden (k_bits, v_bits, per-layer bits)."""
SUPPORTED_GROUP_SIZES = (32, 64, 128)
MICROSCALING = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
"""MLX's microscaling formats: (bits, group size). Each group shares one 8-bit scale."""
MODES = ("affine", *MICROSCALING)
SAME_BITS = "same"
"""How a user writes window_bits 'like the other layers' (stored as None)."""
DEFAULT_WINDOW_BITS = 8
"""The model's own sliding-window layers of a quantized cache are 8-bit unless asked otherwise:
on Gemma 3 270M at 8K tokens, 8-bit window layers give q4-kivi-rot the KLD of 16-bit ones
(0.0049 and 0.0050, against 0.0085 at 4 bits) for 2.6 MiB less (QUALITY.md, 'Long context on
Gemma 3 270M'). A full-precision cache keeps them full precision."""
HADAMARD_BASES = (1, 12, 20, 28)
"""mx.hadamard_transform sizes: m * 2^k for these m."""


class Stage(NamedTuple):
    """From ``start`` tokens on, keys and values take these bits (None: full precision)."""

    start: int
    key_bits: int | None
    value_bits: int | None


def _bits_text() -> str:
    return ", ".join(map(str, SUPPORTED_BITS))


def check_bits(value: int | None, what: str, full_allowed: bool = True) -> None:
    """One rule for every place a user writes bits: 2-8, or 16 for full precision."""
    if value is None or value in SUPPORTED_BITS or (full_allowed and value == FULL_PRECISION):
        return
    full = f", or {FULL_PRECISION} for full precision" if full_allowed else " (or leave it unset for full precision)"
    given = f"{what} {value}" if what.startswith("--") else f"{what}={value}"
    raise UserError(f"{given} is not supported; use one of {_bits_text()}{full}")


def resolve_bits(bits: int | None) -> int | None:
    """User bits -> stored bits: None for full precision."""
    return None if bits in (None, FULL_PRECISION) else bits


@dataclass(frozen=True)
class Precision:
    """What the user asked for, as they wrote it; derived values are properties.

    bits: keys and values (None: full precision). k_bits / v_bits: override for one tensor
    (16 = full precision). group_size: elements per scale (affine). mode: "affine" or a
    microscaling format, which fixes bits and group size. rotate: Hadamard rotation before
    quantizing. per_channel_keys: keys quantized per channel over groups of tokens (KIVI).
    layer_bits: ((layer, bits), ...) per-layer bits. adaptive: ((tokens, bits), ...) steps
    from full precision as the context grows. quantized_kv_start: full precision until then.
    window_bits: bits of the model's own sliding-window layers (Gemma 3's local layers): their
    cache is bounded by the window, so quantizing it saves little (16 = full precision, as
    mlx-lm leaves them; the default ``DEFAULT_WINDOW_BITS`` applies to quantized caches only;
    None = like the other layers).
    """

    bits: int | None = None
    k_bits: int | None = None
    v_bits: int | None = None
    group_size: int = 64
    mode: str = "affine"
    rotate: bool = False
    per_channel_keys: bool = False
    layer_bits: tuple[tuple[int, int], ...] = ()
    adaptive: tuple[tuple[int, int], ...] = ()
    quantized_kv_start: int = 0
    window_bits: int | None = DEFAULT_WINDOW_BITS

    # -- derived ---------------------------------------------------------------------------
    @property
    def format_bits(self) -> int | None:
        """Bits the format implies: a microscaling mode's, the last adaptive step's, or ``bits``."""
        if self.mode in MICROSCALING:
            return MICROSCALING[self.mode][0]
        if self.adaptive:
            return self.adaptive[-1][1]
        return self.bits

    @property
    def group(self) -> int:
        """Elements sharing a scale: fixed by a microscaling mode, else ``group_size``."""
        return MICROSCALING[self.mode][1] if self.mode in MICROSCALING else self.group_size

    @property
    def key_bits(self) -> int | None:
        """Bits of stored keys once quantized; None for full precision."""
        return resolve_bits(self.format_bits if self.k_bits is None else self.k_bits)

    @property
    def value_bits(self) -> int | None:
        return resolve_bits(self.format_bits if self.v_bits is None else self.v_bits)

    @property
    def quantized(self) -> bool:
        return self.key_bits is not None or self.value_bits is not None

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Precision over the context: stage 0 starts at token 0; a full-precision first
        stage comes before ``quantized_kv_start`` or the first adaptive step."""
        if self.adaptive:
            steps = tuple(Stage(tokens, bits, bits) for tokens, bits in self.adaptive)
        else:
            steps = (Stage(self.quantized_kv_start, self.key_bits, self.value_bits),)
        if steps[0].start > 0 or not self.quantized:
            return (Stage(0, None, None), *(s for s in steps if self.quantized))
        return steps

    def for_layer(self, layer: int, n_layers: int, sliding: bool = False) -> "Precision":
        """This precision for one layer: ``layer_bits`` first, else ``window_bits`` on a layer with
        the model's own sliding window."""
        from dataclasses import replace

        if (sliding and self.window_bits is not None and self.quantized
                and not any(i % n_layers == layer for i, _ in self.layer_bits)):
            bits = resolve_bits(self.window_bits)  # affine at those bits, or full precision
            quantized = bits is not None
            return replace(self, bits=bits, k_bits=None, v_bits=None, mode="affine", layer_bits=(), adaptive=(),
                           quantized_kv_start=0, window_bits=None, per_channel_keys=self.per_channel_keys and quantized,
                           rotate=self.rotate and quantized)
        for index, bits in self.layer_bits:
            if index % n_layers == layer:
                return replace(self, bits=resolve_bits(bits), k_bits=None, v_bits=None, layer_bits=())
        return replace(self, layer_bits=()) if self.layer_bits else self

    def label(self) -> str:
        """e.g. '4-bit g64 per-channel K rotated', 'K8V4 g64', 'mxfp4', 'full precision'."""
        if not self.quantized:
            return "full precision"
        kb, vb = self.key_bits, self.value_bits
        bits = f"{kb}-bit" if kb == vb else f"K{kb or FULL_PRECISION}V{vb or FULL_PRECISION}"
        text = f"{bits} g{self.group}" if self.mode == "affine" else self.mode
        if self.per_channel_keys:
            text += " per-channel K"
        if self.rotate:
            text += " rotated"
        if self.layer_bits:
            text += " layers " + ",".join(f"{layer}:{bits}" for layer, bits in self.layer_bits)
        if self.quantized_kv_start:
            text += f" from token {self.quantized_kv_start}"
        if self.adaptive:
            text += " adaptive " + " -> ".join(["fp"] + [f"{b}-bit@{t}" for t, b in self.adaptive])
        return text

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise UserError for settings no store can encode."""
        if self.mode not in MODES:
            raise UserError(f"unknown quantization mode {self.mode!r}; use one of {', '.join(MODES)}")
        check_bits(self.bits, "bits", full_allowed=False)
        check_bits(self.k_bits, "k_bits")
        check_bits(self.v_bits, "v_bits")
        if self.mode in MICROSCALING:
            fixed = MICROSCALING[self.mode][0]
            if self.bits not in (None, fixed) or self.k_bits is not None or self.v_bits is not None:
                raise UserError(f"{self.mode} is {fixed}-bit for keys and values; drop the bits settings")
        if self.mode == "affine" and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise UserError(f"group size {self.group_size} is not supported; use one of "
                            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        for layer, bits in self.layer_bits:
            check_bits(bits, f"layer {layer}: bits")
        check_bits(self.window_bits, "window_bits")
        if self.layer_bits and self.mode != "affine":
            raise UserError("per-layer bits work with affine quantization only")
        self._validate_stages()
        if self.per_channel_keys and self.key_bits is None:
            raise UserError("per-channel keys need quantized keys; set bits or k_bits")

    def _validate_stages(self) -> None:
        if self.quantized_kv_start < 0:
            raise UserError(f"quantized_kv_start must be >= 0, got {self.quantized_kv_start}")
        if not self.adaptive:
            return
        starts = [tokens for tokens, _ in self.adaptive]
        if starts != sorted(set(starts)) or any(t < 0 for t in starts):
            raise UserError("adaptive steps need increasing token counts, e.g. 1024:8,4096:4")
        for _, bits in self.adaptive:
            check_bits(bits, "adaptive step bits", full_allowed=False)
        if self.bits is not None or self.k_bits is not None or self.v_bits is not None:
            raise UserError("with adaptive precision the steps set the bits; drop the other bits settings")
        if self.quantized_kv_start:
            raise UserError("adaptive precision replaces quantized_kv_start; give the first step's token count instead")

    def check_head_dim(self, head_dim: int) -> None:
        """Groups must tile the head dimension; rotation needs a size mx.hadamard_transform supports."""
        if self.rotate and not hadamard_size(head_dim):
            raise UserError(
                f"rotation needs head_dim = m * 2^k with m in {HADAMARD_BASES}; this model's is {head_dim}: "
                "drop the rotation"
            )
        if not self.quantized or head_dim % self.group == 0:
            return
        fitting = [g for g in SUPPORTED_GROUP_SIZES if head_dim % g == 0]
        hint = f"use --kv-group-size {max(fitting)}" if fitting else "this model needs a full-precision cache"
        raise UserError(f"group size {self.group} does not divide the model's head_dim {head_dim}; {hint}")

    def check_layers(self, n_layers: int) -> None:
        for index, _ in self.layer_bits:
            if not -n_layers <= index < n_layers:
                raise UserError(f"layer {index} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")


def hadamard_size(n: int) -> bool:
    """Whether mx.hadamard_transform supports vectors of n elements."""
    for m in HADAMARD_BASES:
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return True
    return False
