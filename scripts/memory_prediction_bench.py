"""Predicted vs measured memory on the real model: the planner's weights + KV bytes against
MLX's peak and active memory over an mlx-lm generation (prompt + decode), per KV config.

    nice -n 10 python scripts/memory_prediction_bench.py --contexts 512 1024 2048 --json out.json

The prediction is what ``mlxkv plan`` shows (the model as this device loads it, caches
allocated token by token); the gap to the peak is the activations of prefill and decode.
"""

from __future__ import annotations

import argparse
import sys

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
import mlx.core as mx
from mlx_lm import stream_generate

from mlxkv.memory import MemoryTracker, layout_from_model, model_weights_bytes, predict_kv_bytes
from mlxkv.units import format_bytes
from mlxkv.report import markdown_table, progress, run_metadata, write_json

MB = 1024**2


def measure(model, tokenizer, config: str, context: int, gen_tokens: int, prefill_step: int) -> dict:
    prompt = mx.random.randint(0, 49152, (context - gen_tokens,), key=mx.random.key(context)).tolist()
    layout = layout_from_model(model)
    weights = model_weights_bytes(model)
    mx.clear_cache()
    cache = mlxkv.make_kv_cache(model, config)
    with MemoryTracker(cache, label=config) as tracker:
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens, prompt_cache=cache,
                                 prefill_step_size=prefill_step):
            tracker.step()
    mx.eval([c.state for c in cache])
    last = tracker.records[-1]
    predicted_kv = predict_kv_bytes(config, layout, context, dtype_bytes=layout.dtype_bytes)
    predicted = weights + predicted_kv
    peak = max(r["peak_bytes"] for r in tracker.records)
    return {
        "config": config,
        "context": context,
        "kv_tokens": last["tokens"],
        "predicted_kv_mb": predicted_kv / MB,
        "measured_kv_mb": sum(c.nbytes for c in cache) / MB,
        "predicted_total_mb": predicted / MB,
        "measured_active_mb": last["active_bytes"] / MB,
        "measured_peak_mb": peak / MB,
        "peak_gap_mb": (peak - predicted) / MB,
        "peak_gap_pct": 100 * (peak - predicted) / peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to load (default: the bundled SmolLM2-135M)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--configs", nargs="+", default=["fp16", "q8", "q4"])
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--prefill-step", type=int, default=2048, help="mlx-lm's prefill chunk (its default 2048)")
    parser.add_argument("--json", help="write the rows and the machine to this file")
    args = parser.parse_args()

    model, tokenizer = mlxkv.load(args.model)
    rows = []
    points = [(c, n) for n in args.contexts for c in args.configs]
    for config, context in progress(points, desc="memory", unit="run"):
        rows.append(measure(model, tokenizer, config, context, args.gen_tokens, args.prefill_step))
    columns = ["config", "context", "predicted_kv_mb", "measured_kv_mb", "predicted_total_mb",
               "measured_active_mb", "measured_peak_mb", "peak_gap_mb", "peak_gap_pct"]
    headers = ["config", "tokens", "KV predicted (MB)", "KV measured (MB)", "weights + KV predicted (MB)",
               "active after (MB)", "peak (MB)", "peak - predicted (MB)", "gap % of peak"]
    print(markdown_table(rows, columns, headers))
    print(f"\nweights: {format_bytes(model_weights_bytes(model))}", file=sys.stderr)
    if args.json:
        write_json(args.json, rows, run_metadata(["python", *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
