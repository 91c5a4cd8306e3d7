"""Prefill memory and speed: the transient a prompt costs beyond the weights and the cache.

Each run prefills a synthetic prompt into a fresh cache as generation does
(``mlxkv.stepping.prefill``: steps of ``prefill_step_size`` tokens without logits, then the
last token's logits) and reads ``mx.get_peak_memory`` after ``mx.reset_peak_memory``. The
transient is that peak minus the weights and minus the bytes the cache allocated: what a
long prompt needs on top of what it leaves behind. Runs are interleaved, every round
visiting every (step, context, config) from a rotating first config, so a shared machine's
drift moves all alike; speed ratios are medians of per-round ratios against mlx-lm's
``KVCache`` (``REFERENCE``) prefilled in the same round, and against the same config at the
first step size measured (a step-size sweep).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.bench.runner import paired_ratio, resolve_configs, synthetic_prompt
from mlxkv.errors import UserError
from mlxkv.eval.configs import CacheSpec
from mlxkv.memory.tracker import layer_kv_bytes, model_weights_bytes
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE, prefill

DEFAULT_PREFILL_CONFIGS = ("q4-kivi-rot", "fp16", "mlxlm-fp16", "mlxlm-q4")
DEFAULT_PREFILL_CONTEXTS = (2048, 4096, 8192)
DEFAULT_ONLY_AT = {"mlxlm-q4": (4096,)}
"""Configs measured at some contexts only: mlx-lm's 4-bit cache prefills at ~7 tokens/s on a CPU."""
REFERENCE = "mlxlm-fp16"

Progress = Callable[[str], None]


def measure_prefill(model: nn.Module, spec: CacheSpec, prompt: mx.array, prefill_step_size: int) -> dict[str, float]:
    """Seconds, peak bytes and the cache's allocated bytes of one prefill into a fresh cache."""
    gc.collect()
    mx.clear_cache()
    cache = spec.make(model)
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = prefill(model, prompt, cache, prefill_step_size)
    seconds = time.perf_counter() - start
    sample = {"seconds": seconds, "peak_bytes": mx.get_peak_memory(), "kv_bytes": sum(layer_kv_bytes(cache))}
    del cache, logits
    gc.collect()
    mx.clear_cache()
    return sample


def _plan(specs: Sequence[CacheSpec], contexts: Sequence[int], steps: Sequence[int],
          only_at: Mapping[str, Sequence[int]]) -> list[tuple[int, int, CacheSpec]]:
    return [(step, n, spec) for step in steps for n in contexts for spec in specs
            if spec.label not in only_at or n in only_at[spec.label]]


def prefill_runs_count(n_runs: int, rounds: int) -> int:
    """How many times ``run_prefill_bench`` calls ``progress`` for ``n_runs`` planned runs."""
    return n_runs * rounds


def run_prefill_bench(
    model: nn.Module,
    configs: Sequence[str] = DEFAULT_PREFILL_CONFIGS,
    contexts: Sequence[int] = DEFAULT_PREFILL_CONTEXTS,
    rounds: int = 3,
    prefill_step_sizes: Sequence[int] = (DEFAULT_PREFILL_STEP_SIZE,),
    only_at: Mapping[str, Sequence[int]] = DEFAULT_ONLY_AT,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per (step size, context, config) measured: ``prefill_tps`` (median over
    rounds) with min/max, ``peak_bytes`` and ``kv_bytes`` (largest over rounds),
    ``weights_bytes``, ``transient_bytes`` = peak - weights - KV, ``transient_vs_first``
    (against the same config and step at the shortest context), ``prefill_tps_vs_reference``
    (paired, against ``REFERENCE`` at the same context and step) and
    ``prefill_tps_vs_first_step`` (paired, against the same config at the first step size)."""
    specs = resolve_configs(configs)
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    if not contexts or any(n < 2 for n in contexts):
        raise UserError("contexts must be at least 2 tokens each")
    if not prefill_step_sizes or any(s < 1 for s in prefill_step_sizes):
        raise UserError("prefill step sizes must be at least 1 token")
    contexts, steps = sorted(dict.fromkeys(contexts)), list(dict.fromkeys(prefill_step_sizes))
    plan = _plan(specs, contexts, steps, only_at)
    prompts = {n: synthetic_prompt(model, n, seed) for n in contexts}
    # first calls build kernels and grow MLX's buffer cache: keep that out of round 1
    for spec in specs:
        measure_prefill(model, spec, prompts[contexts[0]][:64], min(steps))
    samples: dict[tuple[int, int, str], list[dict[str, float]]] = {}
    try:
        for r in range(rounds):
            shift = r % len(plan)
            for step, n, spec in plan[shift:] + plan[:shift]:
                samples.setdefault((step, n, spec.label), []).append(measure_prefill(model, spec, prompts[n], step))
                if progress:
                    progress(f"{spec.label} @ {n} (step {step})")
    except KeyboardInterrupt:  # a long run stopped by hand still reports what it measured (rows' "rounds")
        if not samples:
            raise
        print("prefill bench: interrupted; reporting the runs that finished", file=sys.stderr)
    weights = model_weights_bytes(model)
    rows = [_row(step, n, spec.label, samples[(step, n, spec.label)], weights)
            for step, n, spec in plan if (step, n, spec.label) in samples]
    return _compare(rows, steps[0])


def _row(step: int, context: int, label: str, runs: list[dict[str, float]], weights: int) -> dict[str, Any]:
    tps = [context / s["seconds"] for s in runs]
    peak, kv = max(s["peak_bytes"] for s in runs), max(s["kv_bytes"] for s in runs)
    return {
        "config": label, "context": context, "prefill_step_size": step, "rounds": len(runs),
        "prefill_tps": statistics.median(tps), "prefill_tps_min": min(tps), "prefill_tps_max": max(tps),
        "prefill_tps_trials": tps, "peak_bytes": peak, "kv_bytes": kv, "weights_bytes": weights,
        "transient_bytes": peak - weights - kv,
    }


def _compare(rows: list[dict[str, Any]], first_step: int) -> list[dict[str, Any]]:
    by_key = {(r["prefill_step_size"], r["context"], r["config"]): r for r in rows}
    shortest: dict[tuple[int, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["context"]):
        shortest.setdefault((row["prefill_step_size"], row["config"]), row)
    for row in rows:
        step, n, label = row["prefill_step_size"], row["context"], row["config"]
        first = shortest[(step, label)]
        row["transient_vs_first"] = row["transient_bytes"] / first["transient_bytes"] if first is not row else None
        row["first_context"] = first["context"]
        ref = by_key.get((step, n, REFERENCE))
        row["prefill_tps_vs_reference"] = (
            paired_ratio(row["prefill_tps_trials"], ref["prefill_tps_trials"]) if ref and ref is not row else None)
        same = by_key.get((first_step, n, label))
        row["prefill_tps_vs_first_step"] = (
            paired_ratio(row["prefill_tps_trials"], same["prefill_tps_trials"]) if same and same is not row else None)
    return rows
