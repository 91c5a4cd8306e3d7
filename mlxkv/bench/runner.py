"""Speed and memory of KV caches, ours and mlx-lm's, measured side by side in one process.

Each run: a fresh cache, a synthetic prompt prefilled in chunks (``mlxkv.stepping.prefill``),
then ``gen_tokens`` greedy decode steps (forward one token, argmax, ``mx.eval``), timed with
``time.perf_counter``. Runs are interleaved: every trial visits every context, and within
it every config, starting from a different config each trial, so a machine that speeds up
or slows down (shared, thermally throttled) moves all configs alike. Each row reports
medians over trials and ratios to the rows it should be compared with, measured in the
same run: absolute tokens/s on a shared machine mean little on their own.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.config import KVConfig
from mlxkv.distributed import rank0_print
from mlxkv.errors import UserError, at_least
from mlxkv.eval.configs import CacheSpec, parse_specs
from mlxkv.memory.held import kv_held
from mlxkv.memory.tracker import model_weights_bytes
from mlxkv.stepping import prefill

DEFAULT_CONFIGS = ("fp16", "q8", "q4", "k8v4", "mlxlm-fp16", "mlxlm-q8", "mlxlm-q4")
DEFAULT_CONTEXTS = (1024, 2048, 4096)
DEFAULT_PREFILL_CHUNK = 512
"""Prompt tokens per forward pass, the same for every config. mlx-lm's generate (and mlxkv
generate/serve) use 2048; mlxkv's caches attend in key blocks (mlxkv.attention.blocks), but
mlx-lm's caches still hold [chunk x context] scores on a CPU, which 512 keeps small, and the
earlier tables in BENCHMARKS.md used it."""

PROMPT_NOTE = "synthetic prompt: uniform random token ids (seed {seed}); speed and memory do not depend on the text"
FP16_BYTES = 2

Progress = Callable[[str], None]
"""Called once per finished run with a short label; the CLI advances its progress bar."""


# -- inputs --------------------------------------------------------------------------
def resolve_configs(configs: Sequence[str | KVConfig | CacheSpec]) -> list[CacheSpec]:
    """A CacheSpec per config ("q4", "q4:residual=64", a KVConfig, ...), in order, duplicates
    dropped; UserError listing the known names for a bad one."""
    return parse_specs([c.strip().lower() if isinstance(c, str) else c for c in configs])


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model was built for, when its args say."""
    args = getattr(model, "args", None)
    value = getattr(args, "max_position_embeddings", None)
    return int(value) if value else None


def check_contexts(model: nn.Module, contexts: Sequence[int], gen_tokens: int) -> list[str]:
    """Raise UserError for contexts no run can have; return warnings for those that only
    decode past the model's trained length (harmless for speed and memory)."""
    if not contexts:
        raise UserError("no contexts given; pass e.g. contexts 1024,4096")
    at_least(gen_tokens, 1, "gen_tokens")
    limit = max_context(model)
    warnings = []
    for n in contexts:
        if n < 1:
            raise UserError(f"context {n} is not a positive number of tokens")
        if limit is not None and n > limit:
            raise UserError(
                f"context {n} is longer than the model's maximum of {limit} tokens "
                f"(max_position_embeddings); use contexts up to {limit}"
            )
    if limit is not None and max(contexts) + gen_tokens > limit:
        warnings.append(
            f"the last decode steps at context {max(contexts)} run past the model's {limit} "
            "trained positions; speed and memory are unaffected"
        )
    return warnings


def synthetic_prompt(model: nn.Module, length: int, seed: int = 0) -> mx.array:
    """Uniform random token ids: speed and memory depend on the length, not the text."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 32000
    return mx.random.randint(0, int(vocab), (length,), key=mx.random.key(seed)).astype(mx.int32)


# -- sizes ---------------------------------------------------------------------------
def kv_sizes(model: nn.Module, cache: Sequence[Any]) -> dict[str, int]:
    """The cache's bytes three ways (see ``mlxkv.memory.held``): allocated, filled, and what the
    same tokens take in a 16-bit cache, the yardstick whatever dtype the device computes in."""
    held = kv_held(model, cache)
    return {"kv_bytes": held.allocated, "kv_filled_bytes": held.filled, "kv_fp16_bytes": held.fp16}


# -- one run -------------------------------------------------------------------------
def measure(
    model: nn.Module, spec: CacheSpec, prompt: mx.array, gen_tokens: int, chunk_size: int
) -> dict[str, float]:
    """Prefill ``prompt`` into a fresh cache, then decode ``gen_tokens`` greedy tokens."""
    gc.collect()
    mx.clear_cache()
    cache = spec.make(model)
    mx.reset_peak_memory()

    start = time.perf_counter()
    logits = prefill(model, prompt, cache, chunk_size)
    token = mx.argmax(logits, axis=-1)
    mx.eval(token)
    prefill_s = time.perf_counter() - start
    prefill_peak = mx.get_peak_memory()
    del logits  # a slice of the last chunk's logits would keep [chunk, vocab] alive

    gc.collect()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model(token.reshape(1, 1), cache=cache)
        token = mx.argmax(logits[0, -1], axis=-1)
        mx.eval(token)
    decode_s = time.perf_counter() - start
    mx.eval([c.state for c in cache])  # the last step's cache writes, outside the timing
    decode_peak = mx.get_peak_memory()

    sample = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "peak_memory_bytes": max(prefill_peak, decode_peak),
        "prefill_peak_memory_bytes": prefill_peak,
        "decode_peak_memory_bytes": decode_peak,
        **kv_sizes(model, cache),
    }
    del cache, logits, token
    gc.collect()
    mx.clear_cache()
    return sample


# -- the whole run -------------------------------------------------------------------
def run_bench(
    model: nn.Module,
    configs: Sequence[str | KVConfig | CacheSpec] = DEFAULT_CONFIGS,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    gen_tokens: int = 32,
    trials: int = 3,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    seed: int = 0,
    warmup: bool = True,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Measure every config at every context, ``trials`` times, interleaved; one row per
    (config, context) with medians, spreads (min/max), memory and ratios (see ``add_ratios``)."""
    specs = resolve_configs(configs)
    at_least(trials, 1, "trials")
    at_least(chunk_size, 1, "chunk_size")
    for warning in check_contexts(model, contexts, gen_tokens):
        rank0_print(f"mlxkv: warning: {warning}", file=sys.stderr)
    contexts = list(dict.fromkeys(contexts))
    prompts = {n: synthetic_prompt(model, n, seed) for n in contexts}

    if warmup:  # first calls allocate and build kernels; keep that out of the first config's numbers
        short = synthetic_prompt(model, min(64, min(contexts)), seed)
        for spec in specs:
            measure(model, spec, short, min(4, gen_tokens), chunk_size)
            if progress:
                progress(f"warm-up {spec.label}")

    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for trial in range(trials):
            shift = trial % len(specs)
            for n in contexts:
                for spec in specs[shift:] + specs[:shift]:
                    sample = measure(model, spec, prompts[n], gen_tokens, chunk_size)
                    samples.setdefault((spec.label, n), []).append(sample)
                    if progress:
                        progress(f"{spec.label} @ {n}")
    except KeyboardInterrupt:  # a long run stopped by hand still reports what it measured
        if not samples:
            raise
        rank0_print("mlxkv: interrupted; reporting the runs that finished (see each row's trials)", file=sys.stderr)

    weights = model_weights_bytes(model)
    rows = [
        summarize(spec, n, samples[(spec.label, n)], gen_tokens, weights)
        for n in contexts for spec in specs if (spec.label, n) in samples
    ]
    return add_ratios(rows, specs)


def runs_count(n_configs: int, n_contexts: int, trials: int, warmup: bool = True) -> int:
    """How many times ``run_bench`` calls ``progress``: the size of a progress bar."""
    return n_configs * (n_contexts * trials + (1 if warmup else 0))


def summarize(
    spec: CacheSpec, context: int, samples: list[dict[str, float]], gen_tokens: int, weights: int
) -> dict[str, Any]:
    """One row: medians and spreads of the trials of one (config, context)."""
    prefill_tps = [context / s["prefill_s"] for s in samples]
    decode_tps = [gen_tokens / s["decode_s"] for s in samples]
    kv_bytes = max(s["kv_bytes"] for s in samples)
    kv_filled = max(s["kv_filled_bytes"] for s in samples)
    kv_fp16 = max(s["kv_fp16_bytes"] for s in samples)
    decode_peak = max(s["decode_peak_memory_bytes"] for s in samples)
    overhead = decode_peak - weights - kv_bytes
    return {
        "config": spec.label,
        "description": spec.description,
        "backend": spec.config.backend if spec.config is not None else None,
        "context": context,
        "gen_tokens": gen_tokens,
        "trials": len(samples),
        "prefill_tps": statistics.median(prefill_tps),
        "prefill_tps_min": min(prefill_tps),
        "prefill_tps_max": max(prefill_tps),
        "decode_tps": statistics.median(decode_tps),
        "decode_tps_min": min(decode_tps),
        "decode_tps_max": max(decode_tps),
        "prefill_tps_trials": prefill_tps,
        "decode_tps_trials": decode_tps,
        "peak_memory_bytes": max(s["peak_memory_bytes"] for s in samples),
        "prefill_peak_memory_bytes": max(s["prefill_peak_memory_bytes"] for s in samples),
        "decode_peak_memory_bytes": decode_peak,
        "weights_bytes": weights,
        "kv_bytes": kv_bytes,
        "kv_filled_bytes": kv_filled,
        "kv_fp16_bytes": kv_fp16,
        "kv_vs_fp16": kv_filled / kv_fp16 if kv_fp16 else None,
        "kv_bits_per_element": 8 * FP16_BYTES * kv_filled / kv_fp16 if kv_fp16 else None,
        "decode_overhead_bytes": overhead,
        "decode_overhead_vs_fp16_kv": overhead / kv_fp16 if kv_fp16 else None,
    }


# -- comparisons ---------------------------------------------------------------------
def _widest_bits(config: KVConfig) -> int:
    return max(config.key_bits or 16, config.value_bits or 16)


def baseline_for(config: KVConfig | None, specs: Sequence[CacheSpec]) -> str | None:
    """The label of the mlx-lm config in ``specs`` an mlxkv config competes with: the same
    bits (the wider of keys and values, so K8V4 meets mlx-lm's 8-bit cache), the same
    group size if measured; None for mlx-lm's own rows and when none was measured."""
    if config is None or config.backend == "mlx-lm":
        return None
    bits = _widest_bits(config)
    candidates = [
        s for s in specs
        if s.config is not None and s.config.backend == "mlx-lm" and s.config.max_kv == config.max_kv
        and _widest_bits(s.config) == bits
    ]
    candidates.sort(key=lambda s: s.config.group_size != config.group_size)
    return candidates[0].label if candidates else None


def fp16_reference(specs: Sequence[CacheSpec]) -> str | None:
    """The full-precision config rows are compared with: ours if measured, else mlx-lm's."""
    full = [s for s in specs if s.config is not None and not s.config.quantized and s.config.max_kv is None]
    full.sort(key=lambda s: s.config.backend != "mlxkv")
    return full[0].label if full else None


def add_ratios(
    rows: list[dict[str, Any]], specs: Sequence[CacheSpec], metrics: Sequence[str] = ("decode_tps", "prefill_tps")
) -> list[dict[str, Any]]:
    """Add each row's tokens/s ratios to its mlx-lm baseline and to the full-precision cache
    of the same context, both measured in this run; None where there is none.

    A ratio is the median over trials of per-trial ratios: trial t of a row is compared with
    trial t of its reference, measured in the same round minutes apart, so a load that
    changes between rounds (a shared machine) cancels out."""
    by_key = {(r["config"], r["context"]): r for r in rows}
    configs = {s.label: s.config for s in specs}
    full = fp16_reference(specs)
    for row in rows:
        base = baseline_for(configs.get(row["config"]), specs)
        for label, ref_name in (("baseline", base), ("fp16", full)):
            ref = by_key.get((ref_name, row["context"]))
            row[f"{label}_config"] = ref_name if ref else None
            for metric in metrics:
                row[f"{metric}_vs_{label}"] = paired_ratio(row[f"{metric}_trials"], ref[f"{metric}_trials"]) if ref else None
    return rows


def paired_ratio(values: Sequence[float], references: Sequence[float]) -> float:
    """Median of value/reference over the trials both have (an interrupted run may lack some)."""
    return statistics.median(v / r for v, r in zip(values, references))
