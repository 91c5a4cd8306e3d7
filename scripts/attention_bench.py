"""Decode-step attention alone, every KV scheme beside mlx-lm's caches (mlxkv.bench.attention).

The default model's attention shape (SmolLM2-135M: 9 query heads over 3 KV heads of 64
dimensions, 30 layers), synthetic keys and values, no weights: the time a decode step
spends in the KV cache and attention, which on a CPU the model's float32 matmuls hide.

    python scripts/attention_bench.py --contexts 4096,16384 --rounds 40 \\
        --json attention.json --markdown attention.md
"""

from __future__ import annotations

import argparse
import sys

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.bench.attention import DEFAULT_ATTENTION_CONFIGS, DEFAULT_FILL_CHUNK, attention_runs_count, measure_attention
from mlxkv.cli.common import token_list_arg
from mlxkv.config import split_specs
from mlxkv.errors import UserError
from mlxkv.loading.tiny import SMOLLM2_ATTENTION, tiny_model
from mlxkv.report import check_output_path, markdown_table, progress, run_metadata, text_table, write_json, write_text

COLUMNS = (
    ("config", "config"),
    ("context", "context"),
    ("ms_per_step", "ms/step"),
    ("spread", "steps/s min-max"),
    ("decode_tps_vs_plain", "speed x plain"),
    ("plain_config", "plain counterpart"),
    ("decode_tps_vs_baseline", "speed x mlx-lm same bits"),
    ("baseline_config", "mlx-lm baseline"),
    ("decode_tps_vs_fp16", "speed x fp16"),
    ("bits_per_element", "bits/elt"),
)

NOTES = """\
ms/step: median over rounds of one decode step's attention over all layers (append one
token, attend one query). "speed x ...": median over rounds of the paired speed ratio
(>1: faster) against the plain counterpart (the same bits, format and residual, per token,
unrotated, window instead of H2O), against mlx-lm's QuantizedKVCache with the same bits
(the wider of keys and values) and against the full-precision cache. bits/elt: filled
cache bytes per key/value element held; full precision is float32 on a CPU."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=token_list_arg, default=[4096], metavar="N,N,...",
                        help="tokens in the cache before the timed steps (default 4096)")
    parser.add_argument("--configs", type=split_specs, default=list(DEFAULT_ATTENTION_CONFIGS), metavar="SPEC,...",
                        help=f"KV configs (default {','.join(DEFAULT_ATTENTION_CONFIGS)})")
    parser.add_argument("--layers", type=int, default=30,
                        help="attention layers per step (default 30, as SmolLM2-135M)")
    parser.add_argument("--rounds", type=int, default=40, help="timed decode steps per config (default 40)")
    parser.add_argument("--fill-chunk", type=int, default=DEFAULT_FILL_CHUNK,
                        help=f"tokens written per fill step (default {DEFAULT_FILL_CHUNK})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine/versions to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as markdown to FILE")
    args = parser.parse_args(argv)
    try:
        if args.layers < 1:
            raise UserError("--layers must be at least 1")
        check_output_path(args.json, "--json")
        check_output_path(args.markdown, "--markdown")
        model = tiny_model("llama", num_hidden_layers=args.layers, intermediate_size=16, **SMOLLM2_ATTENTION)
        with progress(total=attention_runs_count(len(args.configs), len(args.contexts), args.rounds),
                      desc="attention bench", unit="step") as bar:
            def advance(label: str) -> None:
                bar.set_postfix_str(label, refresh=False)
                bar.update(1)

            rows = measure_attention(model, args.configs, args.contexts, args.rounds, args.fill_chunk, args.seed,
                                     advance)
    except UserError as e:
        print(f"attention_bench: error: {e}", file=sys.stderr)
        return 2
    shown = [{**r, "spread": f"{r['decode_tps_min']:.3g}-{r['decode_tps_max']:.3g}"} for r in rows]
    metadata = run_metadata(layers=args.layers, rounds=args.rounds, contexts=args.contexts,
                            shape=SMOLLM2_ATTENTION, configs=args.configs)
    m = metadata["machine"]
    about = (f"{args.layers} layers of SmolLM2-135M's attention (9 query / 3 KV heads x 64), "
             "synthetic keys and values; "
             f"{m['machine']} {m['chip']}, {m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}")
    columns, headers = zip(*COLUMNS)
    print("\n".join([about, "", text_table(shown, columns, headers), "", NOTES]))
    if args.json:
        write_json(args.json, rows, metadata)
    if args.markdown:
        write_text(args.markdown, "\n".join([
            "# Decode-step attention", "", f"Command: `{metadata['command']}`  ", f"Date: {metadata['date']}  ",
            about, "", markdown_table(shown, columns, headers), "", NOTES, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
