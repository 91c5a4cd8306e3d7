"""Per-layer precision: which layers' caches hurt most when quantized, and where to spend bits.

Layers are not equally sensitive: quantizing the cache of one layer can cost ten times the
KL divergence of another. A short calibration run measures, for each layer alone, the KL
divergence when only that layer's cache is quantized (the others full precision); the bit
budget then goes to the most sensitive layers first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.config import FULL_PRECISION, KVConfig
from mlxkv.config.precision import check_bits, resolve_bits
from mlxkv.errors import UserError
from mlxkv.eval.configs import CacheSpec
from mlxkv.eval.kld import Progress, chunks_per_run, evaluate_kld

DEFAULT_CALIBRATION_TOKENS = 256
DEFAULT_CHECK_TOKENS = 512
"""Held-out tokens, right after the calibration text, on which the map is checked."""
DEFAULT_BASE = "q3"
DEFAULT_HIGH_BITS = 8


def layer_count(model: nn.Module) -> int:
    return len(model.make_cache()) if hasattr(model, "make_cache") else len(model.layers)


def only_layer(probe: KVConfig, layer: int, n_layers: int) -> KVConfig:
    """``probe`` on one layer, full precision on every other."""
    return probe.replace(layer_bits=tuple((i, FULL_PRECISION) for i in range(n_layers) if i != layer))


def layer_sensitivity(
    model: nn.Module, tokens: Sequence[int] | mx.array, probe: KVConfig, chunk: int = 16,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per layer: ``layer`` and the ``kld`` of quantizing that layer alone with ``probe``."""
    if not probe.quantized:
        raise UserError("calibration needs a quantized probe config, e.g. bits=2")
    n = layer_count(model)
    configs = [only_layer(probe, i, n) for i in range(n)]
    rows = evaluate_kld(model, tokens, configs, chunk=chunk, progress=progress)
    return [{"layer": i, "kld": row["kld"], "top1": row["top1"]} for i, row in enumerate(rows)]


def nominal_bits(bits: int | None, group_size: int) -> float:
    """Bits per element of a packed store: bits plus a 16-bit scale and bias per group
    (None or 16: full precision, 16 bits)."""
    bits = resolve_bits(bits)
    return 16.0 if bits is None else bits + 32 / group_size


def allocate_bits(
    sensitivity: Sequence[float], low_bits: int, high_bits: int, budget: float, group_size: int = 64
) -> tuple[tuple[int, int], ...]:
    """The layers to raise from ``low_bits`` to ``high_bits``, most sensitive first, while the
    mean packed bits per element stays within ``budget``: a ``layer_bits`` value."""
    low, high = nominal_bits(low_bits, group_size), nominal_bits(high_bits, group_size)
    if budget < low:
        raise UserError(f"a budget of {budget} bits per element is below {low_bits}-bit's {low:.2f}; raise it")
    n = len(sensitivity)
    upgrades = min(n, int(n * (budget - low) / (high - low) + 1e-9)) if high > low else 0
    order = sorted(range(n), key=lambda i: sensitivity[i], reverse=True)
    return tuple(sorted((i, high_bits) for i in order[:upgrades]))


def calibrated_config(
    model: nn.Module, tokens: Sequence[int] | mx.array, base: KVConfig, high_bits: int, budget: float,
    chunk: int = 16, progress: Progress | None = None,
) -> tuple[KVConfig, list[dict[str, Any]]]:
    """``base`` with per-layer bits from a calibration run, and the per-layer measurements."""
    if base.bits is None:
        raise UserError("the base config needs bits (the low precision most layers keep)")
    rows = layer_sensitivity(model, tokens, base, chunk, progress)
    layer_bits = allocate_bits([r["kld"] for r in rows], base.bits, high_bits, budget, base.group_size)
    chosen = dict(layer_bits)
    for row in rows:
        row["bits"] = chosen.get(row["layer"], base.bits)
    return base.replace(layer_bits=layer_bits), rows


def format_layer_bits(layer_bits: tuple[tuple[int, int], ...]) -> str:
    """The --kv-bits-map spelling of a layer_bits value."""
    return ",".join(f"{layer}:{bits}" for layer, bits in layer_bits)


def end_layers(count: int, n_layers: int, high_bits: int) -> tuple[tuple[int, int], ...]:
    """The usual guess without calibration: raise the first and last layers, alternating
    from both ends (0, n-1, 1, n-2, ...); ``count`` of them, as a ``layer_bits`` value."""
    order = [i for pair in zip(range(n_layers), reversed(range(n_layers))) for i in pair]
    chosen = list(dict.fromkeys(order))[: max(0, min(count, n_layers))]
    return tuple(sorted((i, high_bits) for i in chosen))


# -- the whole procedure: calibrate on one text, check on the text that follows -------------------
@dataclass
class LayerCalibration:
    """What ``calibrate_and_check`` found: the config with its per-layer bits, one row per layer
    (``layer``, ``kld`` alone, ``top1``, ``bits``) and the held-out check (one row per
    candidate, as ``evaluate_kld`` returns them, plus its ``kv_bits_map``)."""

    config: KVConfig
    rows: list[dict[str, Any]]
    check: list[dict[str, Any]] = field(default_factory=list)
    mean_bits: float = 0.0

    @property
    def bits_map(self) -> str:
        return format_layer_bits(self.config.layer_bits)


def check_layers_request(base: KVConfig, high_bits: int, budget: float | None, *, base_name: str | None = None,
                         high_bits_name: str = "high_bits") -> float:
    """Validate a calibration request before any model is loaded; return the budget (default:
    the base's packed bits plus 0.5). ``base`` must be an mlxkv affine config with bits. The
    names are what the messages call the base and ``high_bits`` (the CLI passes its flags)."""
    base_name = base_name or f"the base config {base.describe()}"
    if base.backend != "mlxkv" or base.bits is None or base.adaptive or base.mode != "affine":
        raise UserError(f"{base_name} cannot take per-layer bits; "
                        "use an mlxkv affine config with bits, such as q3 or q4-rot")
    check_bits(high_bits, high_bits_name)
    low, high = nominal_bits(base.bits, base.group_size), nominal_bits(high_bits, base.group_size)
    if high <= low:
        raise UserError(f"{high_bits_name} {high_bits} is not above the base's {base.bits} bits; raise it")
    budget = low + 0.5 if budget is None else budget
    allocate_bits([0.0], base.bits, high_bits, budget, base.group_size)  # a budget below the base fails now
    return budget


def calibration_chunks(n_layers: int, calibration: int, held_out: int, chunk: int) -> int:
    """Forward passes ``calibrate_and_check`` makes (for one progress bar's total)."""
    total = (n_layers + 1) * chunks_per_run(calibration, chunk)
    if held_out >= 2:
        total += 4 * chunks_per_run(held_out, chunk)  # reference, base, calibrated, end layers
    return total


def calibrate_and_check(
    model: nn.Module, calibration: Sequence[int], held_out: Sequence[int], base: KVConfig, high_bits: int,
    budget: float, chunk: int = 16, label: str | None = None, progress: Progress | None = None,
) -> LayerCalibration:
    """Measure each layer's sensitivity on ``calibration``, spend ``budget`` bits per element on
    the most sensitive layers, then (if ``held_out`` has 2 tokens or more) compare on it the
    base config alone, the calibrated map, and raising as many first and last layers (the
    usual guess without calibration). ``label`` names the base in the check's rows."""
    from mlxkv.caches.factory import make_kv_cache

    label = label or base.describe()
    n_layers = layer_count(model)
    calibrated, rows = calibrated_config(model, calibration, base, high_bits, budget, chunk, progress)
    layer_bits = calibrated.layer_bits
    raised = len(layer_bits)
    low, high = nominal_bits(base.bits, base.group_size), nominal_bits(high_bits, base.group_size)
    result = LayerCalibration(calibrated, rows, mean_bits=(low * (n_layers - raised) + high * raised) / n_layers)
    if len(held_out) < 2 or not layer_bits:
        return result
    guess = end_layers(raised, n_layers, high_bits)
    candidates = [CacheSpec(label, lambda m: make_kv_cache(m, base), base)]
    for name, config in ((f"{label} + calibrated map", calibrated),
                         (f"{label} + first/last layers", base.replace(layer_bits=guess))):
        candidates.append(CacheSpec(name, lambda m, c=config: make_kv_cache(m, c), config))
    result.check = evaluate_kld(model, held_out, candidates, chunk, progress=progress)
    for row, bits in zip(result.check, ((), layer_bits, guess)):
        row["kv_bits_map"] = format_layer_bits(bits)
    return result
