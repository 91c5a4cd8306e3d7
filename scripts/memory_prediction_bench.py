"""Predicted vs measured peak on the real model: ``mlxkv.memory.peak.predict_peak`` against
``mx.get_peak_memory`` over a generation as ``mlxkv generate`` runs it (``Session``: prefill in
steps of ``--prefill-step`` tokens without prompt logits, then a few decoded tokens), per KV
config and context.

    nice -n 10 python scripts/memory_prediction_bench.py --contexts 2048 4096 8192 --json out.json

Two peaks are compared: the run's (MLX's peak counter reset after the load: weights, cache,
prefill transient) and the command's (``mlxkv generate`` reports the peak since the process
started: the larger of the load's peak and the run's).
"""

from __future__ import annotations

import argparse
import gc
import sys

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
import mlx.core as mx

from mlxkv.bench.runner import synthetic_prompt
from mlxkv.engine import Session
from mlxkv.engine.sampling import SamplingParams
from mlxkv.memory import layout_from_model, model_weights_bytes
from mlxkv.memory.peak import model_load_bytes, predict_peak
from mlxkv.report import markdown_table, progress, run_metadata, write_json

MB = 1024**2


def measure(model, tokenizer, config: str, context: int, gen_tokens: int, prefill_step: int,
            load_peak: int) -> dict:
    from mlxkv.config.spec import parse_spec

    layout = layout_from_model(model)
    weights = model_weights_bytes(model)
    prompt = synthetic_prompt(model, context - gen_tokens, seed=context).tolist()
    gc.collect()
    mx.clear_cache()
    kv_config = parse_spec(config)
    session = Session(model, tokenizer, kv_config, prefill_step_size=prefill_step)
    mx.reset_peak_memory()
    for _ in session.generate(prompt, SamplingParams(max_tokens=gen_tokens, temperature=0.0)):
        pass
    measured = mx.get_peak_memory()
    kv = sum(c.nbytes for c in session.cache)
    del session
    p = predict_peak(config, layout, context, weights, dtype_bytes=layout.dtype_bytes,
                     prefill_step=prefill_step, load_bytes=model_load_bytes(model))
    command = max(measured, load_peak)
    return {
        "config": config, "context": context, "prefill_step": prefill_step,
        "kv_predicted_mb": p.kv / MB, "kv_measured_mb": kv / MB,
        "attention_mb": p.attention / MB, "activations_mb": p.activations / MB,
        "run_predicted_mb": p.run / MB, "run_measured_mb": measured / MB,
        "run_error_pct": 100 * (p.run - measured) / measured,
        "weights_plus_kv_error_pct": 100 * (weights + p.kv - measured) / measured,
        "command_predicted_mb": p.peak / MB, "command_measured_mb": command / MB,
        "command_error_pct": 100 * (p.peak - command) / command,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to load (default: the bundled SmolLM2-135M)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--configs", nargs="+", default=["fp16", "q8", "q4-kivi-rot"])
    parser.add_argument("--gen-tokens", type=int, default=4)
    parser.add_argument("--prefill-step", type=int, default=2048, help="prefill step size (mlx-lm's default 2048)")
    parser.add_argument("--json", help="write the rows and the machine to this file")
    args = parser.parse_args()

    model, tokenizer = mlxkv.load(args.model)
    load_peak = mx.get_peak_memory()  # what `mlxkv generate` counts in its peak
    weights = model_weights_bytes(model)
    print(f"weights {weights / MB:.1f} MB, load peak {load_peak / MB:.1f} MB, load transient "
          f"{model_load_bytes(model) / MB:.1f} MB", file=sys.stderr)
    rows = []
    points = [(c, n) for n in args.contexts for c in args.configs]  # in the order given
    for config, context in progress(points, desc="memory", unit="run"):
        rows.append(measure(model, tokenizer, config, context, args.gen_tokens, args.prefill_step, load_peak))
        print(f"{config} @ {context}: run peak predicted {rows[-1]['run_predicted_mb']:.1f} MB, measured "
              f"{rows[-1]['run_measured_mb']:.1f} MB", file=sys.stderr, flush=True)
    columns = ["config", "context", "kv_measured_mb", "attention_mb", "activations_mb", "run_predicted_mb",
               "run_measured_mb", "run_error_pct", "weights_plus_kv_error_pct", "command_predicted_mb",
               "command_measured_mb", "command_error_pct"]
    headers = ["config", "tokens", "KV (MB)", "attention (MB)", "activations (MB)", "run peak predicted (MB)",
               "run peak measured (MB)", "error %", "weights + KV error %", "command peak predicted (MB)",
               "command peak measured (MB)", "error %"]
    print(markdown_table(rows, columns, headers))
    if args.json:
        write_json(args.json, rows, run_metadata(["python", *sys.argv], weights_bytes=weights, load_peak_bytes=load_peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
