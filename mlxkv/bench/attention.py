"""Decode-step attention alone: what each cache layout costs per generated token, without the weights.

In a whole-model decode step on a CPU the weights' float32 matmuls dominate, so caches
that differ twofold in attention time differ by a few percent in tokens/s (BENCHMARKS.md).
This bench isolates the part a cache changes: synthetic keys and values of the model's
attention shape fill every config's per-layer caches to a context, then each round times
one decode step over all layers (append one token's keys and values, attend one query)
for every config, in a rotating order so that a drifting machine moves all configs alike.
Ratios are medians of per-round paired ratios (``runner.paired_ratio``): each row against
its plain counterpart (``plain_counterpart``: the same bits and storage format, without
rotation, per-channel keys or heavy-hitter scoring), against mlx-lm's cache with the same
bits, and against full precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.attention.hook import scaled_dot_product_attention
from mlxkv.bench.runner import add_ratios, paired_ratio, resolve_configs
from mlxkv.caches.factory import model_head_dim
from mlxkv.config import KVConfig
from mlxkv.errors import UserError, at_least
from mlxkv.eval.configs import CacheSpec
from mlxkv.memory.held import bits_per_element

DEFAULT_ATTENTION_CONFIGS = (
    "mlxlm-fp16", "fp16",
    "mlxlm-q8", "q8", "mxfp8", "k8v4",
    "mlxlm-q4", "q4", "q4-nores", "q4-rot", "q4-kivi", "q4-kivi-rot", "k4v3-rot", "mxfp4", "mxfp4-rot", "nvfp4",
)
DEFAULT_FILL_CHUNK = 512

Progress = Callable[[str], None]


def storage_key(config: KVConfig) -> tuple:
    """What fixes a cache's bits and token budget, however the config spells them."""
    return (config.backend, config.mode, config.key_bits, config.value_bits, config.group_size,
            config.effective_residual, config.max_kv, config.sinks, config.quantized_kv_start)


def is_plain(config: KVConfig) -> bool:
    """Stored the plain way: per token, unrotated, one precision for every layer and length,
    a sink window rather than heavy-hitter eviction."""
    return not (config.rotate or config.per_channel_keys or config.layer_bits or config.adaptive
                or config.evict != "window")


def plain_counterpart(config: KVConfig, candidates: Sequence[CacheSpec]) -> str | None:
    """The label of the plain config among ``candidates`` with ``config``'s storage key: what a
    scheme's speed is measured against, so a ratio shows the cost of the scheme, not of its
    bits (MLX's 3-bit kernels, say, are slower than its 4-bit ones whatever the scheme).
    None when ``config`` is plain itself or no candidate matches."""
    if is_plain(config):
        return None
    key = storage_key(config)
    return next((s.label for s in candidates
                 if s.config is not None and is_plain(s.config) and storage_key(s.config) == key), None)


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the model's attention."""
    heads = model.args.num_attention_heads
    return heads, getattr(model.args, "num_key_value_heads", None) or heads, model_head_dim(model)


def fill(model: nn.Module, spec: CacheSpec, context: int, chunk: int = DEFAULT_FILL_CHUNK, seed: int = 0) -> list[Any]:
    """Fresh caches for every layer holding ``context`` tokens of random keys and values,
    written ``chunk`` tokens at a time as a prefill writes them. Caches that score tokens
    (H2O) also attend each chunk, so their scores and evictions are those of a prefill."""
    heads, kv_heads, head_dim = _shape(model)
    caches = spec.make(model)
    scores_tokens = spec.config is not None and spec.config.evict == "h2o" and spec.config.max_kv is not None
    key = mx.random.key(seed)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        key, k1, k2, k3 = mx.random.split(key, 4)
        keys = mx.random.normal((1, kv_heads, n, head_dim), key=k1)
        values = mx.random.normal((1, kv_heads, n, head_dim), key=k2)
        queries = mx.random.normal((1, heads, n, head_dim), key=k3) if scores_tokens else None
        outputs = []
        for cache in caches:
            k, v = cache.update_and_fetch(keys, values)
            if queries is not None:
                outputs.append(scaled_dot_product_attention(queries, k, v, cache, head_dim**-0.5, "causal"))
        mx.eval(outputs, [c.state for c in caches])
    return caches


def decode_step(caches: Sequence[Any], queries: mx.array, keys: mx.array, values: mx.array) -> float:
    """Seconds for one decode step over all layers: append one token, attend one query."""
    scale = queries.shape[-1] ** -0.5
    start = time.perf_counter()
    outputs = []
    for cache in caches:
        k, v = cache.update_and_fetch(keys, values)
        outputs.append(scaled_dot_product_attention(queries, k, v, cache, scale, None))
    mx.eval(outputs)
    return time.perf_counter() - start


def measure_attention(
    model: nn.Module,
    configs: Sequence[str | KVConfig | CacheSpec] = DEFAULT_ATTENTION_CONFIGS,
    contexts: Sequence[int] = (4096,),
    rounds: int = 40,
    chunk: int = DEFAULT_FILL_CHUNK,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per (config, context): ``ms_per_step`` (median over rounds, all layers),
    ``decode_tps`` (steps per second) with its min/max and per-round values,
    ``bits_per_element`` after the run, and paired speed ratios: ``decode_tps_vs_plain``
    against the config's ``plain_counterpart`` when it was measured too,
    ``decode_tps_vs_baseline`` against mlx-lm's cache with the same bits and
    ``decode_tps_vs_fp16`` (see ``runner.add_ratios``)."""
    specs = resolve_configs(configs)
    at_least(rounds, 1, "rounds")
    if chunk < 1 or any(n < 1 for n in contexts):
        raise UserError("contexts and the fill chunk must be at least 1 token")
    heads, kv_heads, head_dim = _shape(model)
    rows = []
    for context in dict.fromkeys(contexts):
        caches = {}
        for spec in specs:
            caches[spec.label] = fill(model, spec, context, chunk, seed)
            if progress:
                progress(f"fill {spec.label} @ {context}")
        times: dict[str, list[float]] = {spec.label: [] for spec in specs}
        key = mx.random.key(seed + 1)
        for r in range(rounds + 1):  # round 0 warms every config up and is not counted
            key, k1, k2, k3 = mx.random.split(key, 4)
            q = mx.random.normal((1, heads, 1, head_dim), key=k1)
            k = mx.random.normal((1, kv_heads, 1, head_dim), key=k2)
            v = mx.random.normal((1, kv_heads, 1, head_dim), key=k3)
            mx.eval(q, k, v)
            shift = r % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                seconds = decode_step(caches[spec.label], q, k, v)
                if r:
                    times[spec.label].append(seconds)
            if progress:
                progress(f"round {r} @ {context}")
        for spec in specs:
            tps = [1.0 / s for s in times[spec.label]]
            rows.append({
                "config": spec.label,
                "description": spec.description,
                "context": context,
                "layers": len(caches[spec.label]),
                "rounds": rounds,
                "ms_per_step": 1000 * statistics.median(times[spec.label]),
                "decode_tps": statistics.median(tps),
                "decode_tps_min": min(tps),
                "decode_tps_max": max(tps),
                "decode_tps_trials": tps,
                "bits_per_element": bits_per_element(model, caches[spec.label]),
            })
        del caches
    rows = add_ratios(rows, specs, metrics=("decode_tps",))
    by_key = {(r["config"], r["context"]): r for r in rows}
    configs = {s.label: s.config for s in specs}
    for row in rows:
        config = configs[row["config"]]
        match = plain_counterpart(config, specs) if config is not None else None
        ref = by_key.get((match, row["context"]))
        row["plain_config"] = match if ref else None
        row["decode_tps_vs_plain"] = paired_ratio(row["decode_tps_trials"], ref["decode_tps_trials"]) if ref else None
    return rows


def attention_runs_count(n_configs: int, n_contexts: int, rounds: int) -> int:
    """How many times ``measure_attention`` calls ``progress``."""
    return n_contexts * (n_configs + rounds + 1)
