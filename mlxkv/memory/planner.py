"""What fits: KV-cache bytes per configuration, predicted from a model's layout.

This is the one place that knows how many bytes each cache holds. Each runtime cache has
a mirror here (``CacheMirror``) that follows the same growth rules without storing
anything, so a prediction can be checked against the real caches' ``nbytes`` exactly:

- ours (``QuantizedCache`` / ``SinkWindowCache``): keys and values each in a store, dense
  (the model's dtype) or affine (``bits`` per element plus a 16-bit scale and bias per
  ``group_size`` elements), grown in steps of 256 tokens and capped by a window; plus the
  newest ``residual`` tokens in 16-bit beside the store (quantized configs only).
- mlx-lm's ``KVCache`` / ``QuantizedKVCache`` (scales and biases in the model's dtype:
  float32 on a CPU device) / ``RotatingKVCache``, for the baselines and the model's own
  sliding windows under ``backend="mlx-lm"``.

"filled" bytes count the tokens held; "allocated" bytes include the growth slack, which
is what memory really holds (and what ``nbytes`` reports).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlxkv.config import KVConfig
from mlxkv.errors import UserError
from mlxkv.memory.layout import LayerSpec, ModelLayout
from mlxkv.units import format_bytes

FP16_BYTES = 2
"""Our affine scales/biases and the residual tier are 16-bit on every device."""
GROWTH_STEP = 256
"""Tokens a store grows by (``TensorStore.step``, mlx-lm's ``KVCache.step``)."""

# -- bytes of one token in one store ----------------------------------------------------------
def token_bytes(dim: int, bits: int | None, group_size: int, dtype_bytes: int,
                scale_bytes: int = FP16_BYTES, mode: str = "affine") -> int:
    """Bytes one head of one token takes in a store: ``dim`` elements in the dtype when
    ``bits`` is None; else ``bits`` per element plus, per group, a scale and a bias
    ("affine") or one 8-bit scale (the microscaling modes). Keys quantized per channel
    (KIVI) take the same: a scale and bias per channel per ``group_size`` tokens."""
    if bits is None:
        return dim * dtype_bytes
    if mode != "affine":
        return dim * bits // 8 + dim // group_size
    return dim * bits // 8 + 2 * scale_bytes * (dim // group_size)


def kv_bytes_per_token(config: KVConfig | str, layers: ModelLayout | LayerSpec | Sequence[LayerSpec | None],
                       dtype_bytes: int = FP16_BYTES, batch: int = 1) -> int:
    """Bytes each new token adds to the cache (all layers, keys and values), once stored
    (the asymptotic rate: the 16-bit residual tier and growth slack are bounded extras).
    Llama-3-8B: fp16 131,072; 4-bit g64 36,864."""
    return sum(m.bytes_per_token for m in mirrors(config, layers, dtype_bytes, batch) if m is not None)


# -- mirrors of the runtime caches --------------------------------------------------------------
class CacheMirror:
    """Follows one layer cache's growth without storing anything. ``feed(n)`` as the model
    would call ``update_and_fetch`` with ``n`` tokens; ``fill(tokens)`` for tokens arriving
    one at a time from empty (the closed form of feeding ones)."""

    bytes_per_token: int  # bytes per stored token (all heads, keys and values)
    slots: int  # tokens the buffers have room for

    def feed(self, n: int) -> None:
        raise NotImplementedError

    def fill(self, tokens: int) -> None:
        raise NotImplementedError

    @property
    def allocated_bytes(self) -> int:
        return self.slots * self.bytes_per_token

    @property
    def filled_bytes(self) -> int:
        raise NotImplementedError


def _round_up(n: int, step: int = GROWTH_STEP) -> int:
    return -(-n // step) * step


class ComposedMirror(CacheMirror):
    """Ours (``ComposedCache``): key/value stores plus 16-bit tiers for the newest ``residual``
    tokens and the ``sinks`` (a window's, or a quantized cache's exact sinks). A window's store is a ring of ``window - residual``
    slots (in whole ``unit``s); stores written a group of tokens at a time (per-channel
    keys) take tokens in whole groups, the rest waits in the 16-bit tier."""

    def __init__(self, config: KVConfig, layer: LayerSpec, dtype_bytes: int, batch: int,
                 window: int | None = None, sinks: int = 0, residual: int = 0) -> None:
        self.config = config
        self.residual = residual
        self.sinks = sinks
        self.group_unit = config.precision.group if config.per_channel_keys else 1
        self.capacity = None if window is None else _round_up(window - residual, self.group_unit)
        self.packed = config.quantized and config.quantized_kv_start == 0
        self.offset = self.flushed = self.slots = 0
        rows = layer.kv_heads * batch
        self._dense_rate = rows * (layer.key_dim + layer.value_dim) * dtype_bytes
        self._packed_rate = rows * (
            token_bytes(layer.key_dim, config.key_bits, config.precision.group, dtype_bytes, mode=config.mode)
            + token_bytes(layer.value_dim, config.value_bits, config.precision.group, dtype_bytes, mode=config.mode)
        )
        # 16-bit tiers for quantized configs; the model's dtype for full-precision ones
        tier_bytes = FP16_BYTES if config.quantized else dtype_bytes
        self._tier_rate = rows * (layer.key_dim + layer.value_dim) * tier_bytes
        self.bytes_per_token = self._packed_rate if config.quantized else self._dense_rate

    @property
    def _rate(self) -> int:
        return self._packed_rate if self.packed else self._dense_rate

    @property
    def _unit(self) -> int:
        """Tokens the stores take at a time: a group for per-channel keys, once packed."""
        return self.group_unit if self.packed and self.config.key_bits is not None else 1

    def _align(self, flushed: int) -> int:
        if flushed <= self.sinks:
            return flushed
        return flushed - (flushed - self.sinks) % self._unit

    def _stored(self, flushed: int) -> int:
        """Store slots in use once positions < ``flushed`` left the recent tier."""
        stored = max(flushed - self.sinks, 0)
        return stored if self.capacity is None else min(stored, self.capacity)

    def _reserve(self, top: int) -> None:
        """``TensorStore._reserve``: whole steps, never past the ring."""
        if top > self.slots:
            target = _round_up(top)
            self.slots = target if self.capacity is None else min(max(target, top), self.capacity)

    def feed(self, n: int) -> None:
        if self.config.quantized and not self.packed and self.offset >= self.config.quantized_kv_start:
            self.packed = True  # re-encoded in place; a cut group returns to the 16-bit tier
            self.flushed = self._align(self.flushed)
        end = self.offset + n
        self.flushed = self._align(max(self.flushed, end - self.residual))
        self._reserve(self._stored(self.flushed))
        self.offset = end

    def fill(self, tokens: int) -> None:
        self.packed = self.config.quantized and self.config.quantized_kv_start == 0
        self.offset = self.flushed = self.slots = 0
        start = self.config.quantized_kv_start if self.config.quantized else 0
        for n in (min(tokens, start), tokens - min(tokens, start)):  # the same as one token at a time
            if n:
                self.feed(n)

    @property
    def _tiers(self) -> int:
        """Tokens in the 16-bit tiers: the sinks and the recent ones."""
        return min(self.flushed, self.sinks) + self.offset - self.flushed

    @property
    def allocated_bytes(self) -> int:
        return self.slots * self._rate + self._tiers * self._tier_rate

    @property
    def filled_bytes(self) -> int:
        return self._stored(self.flushed) * self._rate + self._tiers * self._tier_rate


class MlxLmMirror(CacheMirror):
    """mlx-lm's ``KVCache`` and ``QuantizedKVCache``: grow by whole steps past what a chunk
    needs, trimming a partly filled last step first (so chunking changes the slack)."""

    def __init__(self, layer: LayerSpec, dtype_bytes: int, batch: int,
                 bits: int | None = None, group_size: int = 64) -> None:
        def one(dim: int) -> int:  # mlx-lm packs dim // (32 // bits) uint32s; scales in the dtype
            if bits is None:
                return dim * dtype_bytes
            return dim // (32 // bits) * 4 + 2 * dtype_bytes * (dim // group_size)

        self.bytes_per_token = layer.kv_heads * batch * (one(layer.key_dim) + one(layer.value_dim))
        self.offset = self.slots = 0

    def feed(self, n: int) -> None:
        if self.slots == 0 or self.offset + n > self.slots:
            if self.slots and self.offset % GROWTH_STEP:
                self.slots = self.offset
            self.slots += _round_up(n)
        self.offset += n

    def fill(self, tokens: int) -> None:
        self.offset, self.slots = tokens, _round_up(tokens)

    @property
    def filled_bytes(self) -> int:
        return self.offset * self.bytes_per_token


class RotatingMirror(CacheMirror):
    """mlx-lm's ``RotatingKVCache``: grows by steps to ``max_size`` one token at a time; a
    multi-token chunk is concatenated, briefly holding up to ``max_size + chunk - 1``."""

    def __init__(self, layer: LayerSpec, dtype_bytes: int, batch: int, max_size: int, keep: int) -> None:
        self.bytes_per_token = layer.kv_heads * batch * (layer.key_dim + layer.value_dim) * dtype_bytes
        self.max_size, self.keep = max_size, keep
        self.offset = self.slots = self.idx = 0

    def feed(self, n: int) -> None:
        if n == 1:
            if self.slots == 0 or (self.offset >= self.slots and self.slots < self.max_size):
                self.slots += min(GROWTH_STEP, self.max_size - self.offset)
                self.idx = self.offset
            if self.slots > self.max_size:
                self.slots = self.idx = self.max_size
            if self.idx == self.max_size:
                self.idx = self.keep
            self.idx += 1
        else:
            if self.slots == 0:
                self.slots = n
            else:
                if self.idx != self.slots and self.idx >= self.offset:
                    self.slots = self.idx  # temporal order drops the unused tail
                trim = self.slots - self.max_size + 1
                self.slots = self.slots - max(trim, 0) + n
            self.idx = self.slots
        self.offset += n

    def fill(self, tokens: int) -> None:
        self.offset, self.slots = tokens, min(_round_up(tokens), self.max_size) if tokens else 0
        self.idx = 0

    @property
    def filled_bytes(self) -> int:
        return min(self.offset, self.max_size) * self.bytes_per_token


def _mirror(config: KVConfig, layer: LayerSpec, dtype_bytes: int, batch: int) -> CacheMirror:
    """The cache ``make_kv_cache`` gives this layer under ``config`` (see caches/factory.py)."""
    if config.backend == "mlx-lm":
        if layer.window is not None:
            return RotatingMirror(layer, dtype_bytes, batch, layer.window, layer.keep)
        if config.bits is not None:
            return MlxLmMirror(layer, dtype_bytes, batch, config.bits, config.group_size)
        if config.max_kv is not None:
            return RotatingMirror(layer, dtype_bytes, batch, config.max_kv, config.sinks)
        return MlxLmMirror(layer, dtype_bytes, batch)
    if layer.window is not None:  # the model's own window: SinkWindowCache(window - keep, keep)
        window, sinks = layer.window - layer.keep, layer.keep
    elif config.max_kv is not None:
        window, sinks = config.max_kv - config.sinks, config.sinks
    else:
        return ComposedMirror(config, layer, dtype_bytes, batch, sinks=config.exact_sinks,
                              residual=config.effective_residual)
    residual = min(config.effective_residual, window // 2)
    return ComposedMirror(config, layer, dtype_bytes, batch, window, sinks, residual)


def mirrors(config: KVConfig | str, layers: ModelLayout | Sequence[LayerSpec | None],
            dtype_bytes: int = FP16_BYTES, batch: int = 1) -> list[CacheMirror | None]:
    """One mirror per cache of the model (None where the cache is not a KV cache), with
    per-layer bits applied as ``make_kv_cache`` does."""
    config, specs = _as_config(config), _layers(layers)
    return [None if layer is None else _mirror(config.for_layer(i, len(specs)), layer, dtype_bytes, batch)
            for i, layer in enumerate(specs)]


def predict_layer_bytes(config: KVConfig | str, layers: ModelLayout | Sequence[LayerSpec | None],
                        tokens: int | None = None, *, chunks: Iterable[int] | None = None,
                        dtype_bytes: int = FP16_BYTES, batch: int = 1, allocated: bool = True) -> list[int]:
    """Bytes of each cache after ``tokens`` tokens arrived one at a time, or after the chunk
    sizes in ``chunks`` (a prefill, then decode steps); 0 for caches that are not KV caches."""
    if (tokens is None) == (chunks is None):
        raise ValueError("pass tokens or chunks")
    chunk_list = list(chunks) if chunks is not None else None
    config, specs = _as_config(config), _layers(layers)
    done: dict[tuple[KVConfig, LayerSpec], int] = {}  # identical layers share one simulation
    result = []
    for i, layer in enumerate(specs):
        if layer is None:
            result.append(0)
            continue
        key = (config.for_layer(i, len(specs)), layer)
        if key not in done:
            mirror = _mirror(*key, dtype_bytes, batch)
            if chunk_list is None:
                mirror.fill(int(tokens))
            else:
                for n in chunk_list:
                    mirror.feed(n)
            done[key] = mirror.allocated_bytes if allocated else mirror.filled_bytes
        result.append(done[key])
    return result


def predict_kv_bytes(config: KVConfig | str, layers: ModelLayout | Sequence[LayerSpec | None],
                     tokens: int | None = None, **kwargs: Any) -> int:
    """Total KV bytes after ``tokens`` (or ``chunks=``); see ``predict_layer_bytes``."""
    return sum(predict_layer_bytes(config, layers, tokens, **kwargs))


def _layers(layers: ModelLayout | LayerSpec | Sequence[LayerSpec | None]) -> Sequence[LayerSpec | None]:
    if isinstance(layers, ModelLayout):
        return layers.layers
    if isinstance(layers, LayerSpec):
        return [layers]
    return layers


def _as_config(config: KVConfig | str) -> KVConfig:
    return KVConfig.from_name(config) if isinstance(config, str) else config


# -- the plan ---------------------------------------------------------------------------------
MAX_TOKENS = 2**40
"""Beyond any context: a cache that still fits here is bounded (every layer is a window)."""


@dataclass(frozen=True)
class PlanRow:
    """One KV configuration at the target context. ``max_context`` None: unbounded (windows)."""

    config: str
    description: str
    bits_per_element: float
    kv_bytes_per_token: int
    kv_bytes: int
    weights_bytes: int
    total_bytes: int
    max_context: int | None
    fits: bool
    baseline: bool = False  # mlx-lm's caches: shown for comparison, never recommended

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_context(config: KVConfig, layout: ModelLayout, budget: int, weights_bytes: int,
                dtype_bytes: int = FP16_BYTES, batch: int = 1) -> int | None:
    """The most tokens whose cache (allocated, one token at a time) plus the weights fit
    ``budget``; None when the cache is bounded and always fits."""
    room = budget - weights_bytes

    def fits(tokens: int) -> bool:
        return predict_kv_bytes(config, layout, tokens, dtype_bytes=dtype_bytes, batch=batch) <= room

    if room < 0 or not fits(0):
        return 0
    if fits(MAX_TOKENS):
        return None
    low, high = 0, MAX_TOKENS  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def plan(layout: ModelLayout, context: int, budget: int, weights_bytes: int,
         configs: Mapping[str, KVConfig], dtype_bytes: int = FP16_BYTES, batch: int = 1) -> list[PlanRow]:
    """One row per configuration: bytes per token, KV bytes at ``context``, total with the
    weights, the longest context that fits ``budget``, and whether ``context`` fits."""
    if not layout.attention_layers:
        raise UserError("this model has no attention layers with a KV cache; there is nothing to plan")
    if context < 1:
        raise UserError(f"the target context must be at least 1 token, got {context}")
    if batch < 1:
        raise UserError(f"the batch size must be at least 1, got {batch}")
    rows = []
    elements = sum(layer.elements_per_token for layer in layout.attention_layers) * batch
    for name, config in configs.items():
        per_token = kv_bytes_per_token(config, layout, dtype_bytes, batch)
        kv = predict_kv_bytes(config, layout, context, dtype_bytes=dtype_bytes, batch=batch)
        total = weights_bytes + kv
        rows.append(PlanRow(
            config=name,
            description=config.describe(),
            bits_per_element=round(8 * per_token / elements, 3),
            kv_bytes_per_token=per_token,
            kv_bytes=kv,
            weights_bytes=weights_bytes,
            total_bytes=total,
            max_context=max_context(config, layout, budget, weights_bytes, dtype_bytes, batch),
            fits=total <= budget,
            baseline=config.backend == "mlx-lm",
        ))
    return rows


def compatible_configs(configs: Mapping[str, KVConfig], layout: ModelLayout) -> tuple[dict[str, KVConfig], dict[str, str]]:
    """(configs this model's head sizes allow, {name: why not} for the others)."""
    usable, skipped = {}, {}
    for name, config in configs.items():
        try:
            for layer in layout.attention_layers:
                config.precision.check_head_dim(layer.key_dim)
                config.precision.check_head_dim(layer.value_dim)
        except UserError as e:
            skipped[name] = str(e)
        else:
            usable[name] = config
    return usable, skipped


def candidate_configs(names: Sequence[str] | None = None, skip_invalid: bool = False,
                      **overrides: Any) -> Any:
    """Configurations by name or spec string (default: every scheme of the registry, best
    measured first) with the user's field overrides applied to each. ``skip_invalid``: return
    ``(configs, {name: why})``, leaving out the schemes the overrides rule out."""
    from mlxkv.config.spec import parse_spec
    from mlxkv.schemes import ranked

    fields = {k: v for k, v in overrides.items() if v is not None}
    configs, invalid = {}, {}
    for name in names or [s.name for s in ranked()]:
        try:
            configs[name] = parse_spec(name, **fields)
        except UserError as e:
            if not skip_invalid:
                raise
            invalid[name] = str(e)
    return (configs, invalid) if skip_invalid else configs


def recommend(rows: Sequence[PlanRow], budget: int, context: int) -> tuple[str, str] | None:
    """(name, reason) of the row that fits with the best measured quality (the registry's KL
    divergence; unmeasured configs after, most bits first); None if none fits."""
    from mlxkv.schemes import quality_rank

    ranked = sorted((row for row in rows if not row.baseline),
                    key=lambda row: (*quality_rank(row.config), -row.bits_per_element))
    for i, row in enumerate(ranked):
        if row.fits:
            reason = (
                f"{row.config} ({row.description}) is the highest-quality configuration that fits: "
                f"{context:,} tokens of KV cache ({format_bytes(row.kv_bytes)}) plus the weights "
                f"({format_bytes(row.weights_bytes)}) make {format_bytes(row.total_bytes)} "
                f"of the {format_bytes(budget)} budget"
            )
            if i > 0:
                better = ranked[i - 1]
                reason += f"; {better.config} would need {format_bytes(better.total_bytes)}"
            return row.config, reason
    return None


def no_fit_message(rows: Sequence[PlanRow], budget: int, context: int) -> str:
    """One line for when nothing fits: the smallest need and what to change."""
    smallest = min(rows, key=lambda r: r.total_bytes)
    if smallest.weights_bytes > budget:
        return (f"the weights alone ({format_bytes(smallest.weights_bytes)}) exceed the "
                f"{format_bytes(budget)} budget; use a smaller or more quantized model, or raise --memory")
    longest = max(rows, key=lambda r: math.inf if r.max_context is None else r.max_context)
    return (
        f"no KV configuration fits {context:,} tokens in {format_bytes(budget)}: even "
        f"{smallest.config} needs {format_bytes(smallest.total_bytes)}; shorten the context "
        f"(at most {longest.max_context:,} tokens with {longest.config}), bound the cache with "
        f"--max-kv, or raise --memory"
    )


def recommend_config(
    model_or_config: Any, context: int, budget: int | str | None = None,
    candidates: Sequence[str] | None = None, *, weights_bytes: int | None = None,
    dtype_bytes: int | None = None, batch: int = 1, **overrides: Any,
) -> tuple[str, str]:
    """The best-quality named KV configuration whose cache at ``context`` tokens plus the
    weights fits ``budget``, and why: what ``mlxkv generate --kv-bits auto`` uses.

    ``model_or_config``: a loaded model (exact layout, dtype and weight bytes), a config.json
    dict, or a ``ModelLayout``. ``budget``: bytes, a size such as "8GB", or None for this
    machine's recommended working set. ``overrides``: KVConfig fields applied to every
    candidate (group_size, max_kv, sinks, residual). Raises UserError when nothing fits.
    """
    import mlx.nn as nn

    from mlxkv.memory.machine_memory import device_memory
    from mlxkv.memory.layout import layout_from_config, layout_from_model, parameter_count
    from mlxkv.memory.tracker import model_weights_bytes
    from mlxkv.units import parse_bytes

    if isinstance(model_or_config, nn.Module):
        layout = layout_from_model(model_or_config)
        if weights_bytes is None:
            weights_bytes = model_weights_bytes(model_or_config)
    elif isinstance(model_or_config, ModelLayout):
        layout = model_or_config
    else:
        layout = layout_from_config(model_or_config)
    dtype_bytes = dtype_bytes or layout.dtype_bytes or FP16_BYTES
    if weights_bytes is None:
        params = parameter_count(model_or_config) if isinstance(model_or_config, dict) else None
        weights_bytes = (params or 0) * dtype_bytes
    if budget is None:
        budget = device_memory().recommended
    elif not isinstance(budget, int):
        budget = parse_bytes(budget, "memory budget")
    named, invalid = candidate_configs(candidates, skip_invalid=True, **overrides)
    configs, skipped = compatible_configs(named, layout)
    if not configs:
        raise UserError(next(iter({**invalid, **skipped}.values())))
    rows = plan(layout, context, budget, weights_bytes, configs, dtype_bytes, batch)
    choice = recommend(rows, budget, context)
    if choice is None:
        raise UserError(no_fit_message(rows, budget, context))
    return choice
