"""What fits: the plan of KV configurations against a context and a memory budget.

Bytes come from ``mlxkv.memory.cache_bytes`` (the caches' own bookkeeping) and the run's
predicted peak from ``mlxkv.memory.peak`` (weights, cache, the largest prefill step's
transient, the load's own peak); quality from the scheme registry (``mlxkv.schemes``). A
configuration fits when its predicted peak does. ``recommend`` takes the best measured
configuration that fits; ``mlxkv plan`` and ``--kv-bits auto`` read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlxkv.config import KVConfig
from mlxkv.errors import UserError
from mlxkv.memory.cache_bytes import FP16_BYTES, kv_bytes_per_token, stored_bytes_per_token
from mlxkv.memory.layout import ModelLayout
from mlxkv.memory.peak import model_load_bytes, predict_peak
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE
from mlxkv.units import format_bytes


# -- the plan ---------------------------------------------------------------------------------
MAX_TOKENS = 2**40
"""Beyond any context: a cache that still fits here is bounded (every layer is a window)."""


@dataclass(frozen=True)
class PlanRow:
    """One KV configuration at the target context. ``total_bytes``: weights + KV;
    ``peak_bytes``: the run's predicted peak (``mlxkv.memory.peak``), what ``fits`` compares
    with the budget. ``max_context`` None: unbounded (windows). ``kv_bytes_per_token``: what
    a new token adds at long context (bounded layers add nothing once full);
    ``bits_per_element``: the stored precision over every layer."""

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
    peak_bytes: int = 0
    prefill_bytes: int = 0  # the largest prefill step's transient (attention and other activations)
    load_bytes: int = 0  # what loading holds above the weights at its peak

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_context(config: KVConfig, layout: ModelLayout, budget: int, weights_bytes: int,
                dtype_bytes: int = FP16_BYTES, batch: int = 1,
                prefill_step: int = DEFAULT_PREFILL_STEP_SIZE, load_bytes: int = 0) -> int | None:
    """The most tokens whose predicted peak (``predict_peak``: the weights, the cache allocated
    one token at a time, a prefill step's transient, the load's peak) fits ``budget``; None
    when the cache is bounded and always fits. The peak never falls as the context grows, so
    the boundary is found by bisection."""

    def fits(tokens: int) -> bool:
        return predict_peak(config, layout, tokens, weights_bytes, dtype_bytes=dtype_bytes, batch=batch,
                            prefill_step=prefill_step, load_bytes=load_bytes).peak <= budget

    if not fits(0):  # the load's peak alone is over the budget, or the weights
        return 0
    if fits(MAX_TOKENS):
        return None
    low, high = 0, MAX_TOKENS  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def plan(layout: ModelLayout, context: int, budget: int, weights_bytes: int,
         configs: Mapping[str, KVConfig], dtype_bytes: int = FP16_BYTES, batch: int = 1,
         prefill_step: int = DEFAULT_PREFILL_STEP_SIZE, load_bytes: int = 0) -> list[PlanRow]:
    """One row per configuration: bytes per token, KV bytes at ``context``, total with the
    weights, the predicted peak of prefilling ``context`` tokens in steps of ``prefill_step``
    (``load_bytes``: what loading holds above the weights), the longest context whose peak
    fits ``budget``, and whether ``context`` fits."""
    if not layout.attention_layers:
        raise UserError("this model has no attention layers with a KV cache; there is nothing to plan")
    if context < 1:
        raise UserError(f"the target context must be at least 1 token, got {context}")
    if batch < 1:
        raise UserError(f"the batch size must be at least 1, got {batch}")
    if prefill_step < 1:
        raise UserError(f"the prefill step size must be at least 1 token, got {prefill_step}")
    rows = []
    elements = sum(layer.elements_per_token for layer in layout.attention_layers) * batch
    for name, config in configs.items():
        per_token = kv_bytes_per_token(config, layout, dtype_bytes, batch)
        peak = predict_peak(config, layout, context, weights_bytes, dtype_bytes=dtype_bytes, batch=batch,
                            prefill_step=prefill_step, load_bytes=load_bytes)
        kv = peak.kv
        total = weights_bytes + kv
        rows.append(PlanRow(
            config=name,
            description=config.describe(),
            bits_per_element=round(8 * stored_bytes_per_token(config, layout, dtype_bytes, batch) / elements, 3),
            kv_bytes_per_token=per_token,
            kv_bytes=kv,
            weights_bytes=weights_bytes,
            total_bytes=total,
            max_context=max_context(config, layout, budget, weights_bytes, dtype_bytes, batch,
                                    prefill_step, load_bytes),
            fits=peak.peak <= budget,
            baseline=config.backend == "mlx-lm",
            peak_bytes=peak.peak,
            prefill_bytes=peak.prefill,
            load_bytes=load_bytes,
        ))
    return rows


def weights_per_rank(weights_bytes: int, layout: ModelLayout, block_share: float | None) -> int:
    """Bytes of weights one rank of ``layout`` holds. mlx-lm shards the transformer blocks (tensor
    parallel: a share of every block; pipeline: whole blocks), ``layout.block_share`` of them per
    rank, and keeps the embeddings, final norm and output head whole on every rank.
    ``block_share``: the blocks' part of the parameters (``memory.layout.block_parameter_share``); None
    when unknown, and then every weight is taken as split."""
    if layout.ranks == 1:
        return weights_bytes
    in_blocks = weights_bytes * (1.0 if block_share is None else block_share)
    return round(weights_bytes - in_blocks + in_blocks * layout.block_share)


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
                f"{context:,} tokens of KV cache ({format_bytes(row.kv_bytes)}), the weights "
                f"({format_bytes(row.weights_bytes)}) and a prefill step ({format_bytes(row.prefill_bytes)}) "
                f"peak at {format_bytes(row.peak_bytes)} of the {format_bytes(budget)} budget"
            )
            if row.peak_bytes == row.weights_bytes + row.load_bytes and row.load_bytes:
                reason += f" (the load's peak: {format_bytes(row.load_bytes)} above the weights)"
            if i > 0:
                better = ranked[i - 1]
                reason += f"; {better.config} would need {format_bytes(better.peak_bytes)}"
            return row.config, reason
    return None


def no_fit_message(rows: Sequence[PlanRow], budget: int, context: int) -> str:
    """One line for when nothing fits: the smallest need and what to change."""
    smallest = min(rows, key=lambda r: r.peak_bytes)
    if smallest.weights_bytes > budget:
        return (f"the weights alone ({format_bytes(smallest.weights_bytes)}) exceed the "
                f"{format_bytes(budget)} budget; use a smaller or more quantized model, or raise --memory")
    if smallest.weights_bytes + smallest.load_bytes > budget:
        return (f"loading the weights ({format_bytes(smallest.weights_bytes)}) peaks at "
                f"{format_bytes(smallest.weights_bytes + smallest.load_bytes)}, above the {format_bytes(budget)} "
                f"budget (quantized weights are expanded on load); pass --keep-quantized-weights, use a smaller model, "
                f"or raise --memory")
    longest = max(rows, key=lambda r: math.inf if r.max_context is None else r.max_context)
    return (
        f"no KV configuration fits {context:,} tokens in {format_bytes(budget)}: even "
        f"{smallest.config} peaks at {format_bytes(smallest.peak_bytes)}; shorten the context "
        f"(at most {longest.max_context:,} tokens with {longest.config}), bound the cache with "
        f"--max-kv, lower --prefill-step-size, or raise --memory"
    )


def recommend_config(
    model_or_config: Any, context: int, budget: int | str | None = None,
    candidates: Sequence[str] | None = None, *, weights_bytes: int | None = None,
    dtype_bytes: int | None = None, batch: int = 1, prefill_step: int | None = None,
    load_bytes: int | None = None, **overrides: Any,
) -> tuple[str, str]:
    """The best-quality named KV configuration whose predicted peak at ``context`` tokens
    (weights, cache, a prefill step of ``prefill_step`` tokens, the load's peak) fits
    ``budget``, and why: what ``mlxkv generate --kv-bits auto`` uses.

    ``model_or_config``: a loaded model (exact layout, dtype and weight bytes), a config.json
    dict, or a ``ModelLayout``. ``budget``: bytes, a size such as "8GB", or None for this
    machine's recommended working set. ``overrides``: KVConfig fields applied to every
    candidate (group_size, max_kv, sinks, residual). ``load_bytes``: what loading held above
    the weights (default: as ``mlxkv.load`` measured it for a loaded model, else 0). Raises
    UserError when nothing fits.
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
        if load_bytes is None:
            load_bytes = model_load_bytes(model_or_config)
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
    rows = plan(layout, context, budget, weights_bytes, configs, dtype_bytes, batch,
                prefill_step or DEFAULT_PREFILL_STEP_SIZE, load_bytes or 0)
    choice = recommend(rows, budget, context)
    if choice is None:
        raise UserError(no_fit_message(rows, budget, context))
    return choice
