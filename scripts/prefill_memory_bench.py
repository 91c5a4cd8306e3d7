"""Prefill memory and speed on the real model, mlxkv's caches beside mlx-lm's (mlxkv.bench.prefill).

The transient of a prefill (peak - weights - KV bytes) at several prompt lengths, prompt
fed as generation feeds it (steps of --steps tokens, no logits but the last token's), and
prefill tokens/s against mlx-lm's KVCache measured in the same rounds (paired ratios).

    python scripts/prefill_memory_bench.py --contexts 2048,4096,8192 --rounds 3 \\
        --json prefill.json --markdown prefill.md
    python scripts/prefill_memory_bench.py --configs q4-kivi-rot,mlxlm-fp16 --contexts 4096 \\
        --steps 2048,512,1024,4096          # a step-size sweep, ratios against the first
"""

from __future__ import annotations

import argparse
import sys

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.bench.prefill import (
    DEFAULT_ONLY_AT, DEFAULT_PREFILL_CONFIGS, DEFAULT_PREFILL_CONTEXTS, _plan, prefill_runs_count, run_prefill_bench,
)
from mlxkv.bench.runner import resolve_configs
from mlxkv.cli.common import token_list_arg
from mlxkv.errors import UserError
from mlxkv.report import check_output_path, markdown_table, progress, run_metadata, text_table, write_json, write_text
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

MIB = 2**20
COLUMNS = (
    ("config", "config"),
    ("context", "context"),
    ("prefill_step_size", "step"),
    ("prefill_tps", "prefill tok/s"),
    ("spread", "min-max"),
    ("prefill_tps_vs_reference", "speed x mlx-lm fp16"),
    ("prefill_tps_vs_first_step", "speed x first step"),
    ("peak_over_weights_mib", "peak - weights MiB"),
    ("kv_mib", "KV MiB"),
    ("transient_mib", "transient MiB"),
    ("transient_vs_first", "transient x shortest"),
)

NOTES = """\
peak - weights: mx.get_peak_memory over the prefill (after mx.reset_peak_memory) minus the
weights. transient: that minus the KV bytes the cache allocated. "transient x shortest":
against the same config at the shortest context. Speed ratios: medians over rounds of
per-round ratios (>1: faster) against mlx-lm's KVCache (float32 on a CPU) at the same
context and step, and against the same config at the first step size listed."""


def _name_list(text: str) -> list[str]:
    """argparse type for configs: 'q4-kivi-rot,mlxlm-fp16' -> ['q4-kivi-rot', 'mlxlm-fp16']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _only_at(items: list[str]) -> dict[str, tuple[int, ...]]:
    """['mlxlm-q4@4096,8k'] -> {'mlxlm-q4': (4096, 8192)}."""
    limits = {}
    for item in items:
        name, sep, contexts = item.partition("@")
        if not sep or not name.strip():
            raise UserError(f"cannot read --only {item!r}; write CONFIG@N,N, e.g. mlxlm-q4@4096")
        limits[name.strip().lower()] = tuple(token_list_arg(contexts))
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model to load (default: the bundled SmolLM2-135M)")
    parser.add_argument("--contexts", type=token_list_arg, default=list(DEFAULT_PREFILL_CONTEXTS), metavar="N,N,...",
                        help=f"prompt lengths (default {','.join(map(str, DEFAULT_PREFILL_CONTEXTS))})")
    parser.add_argument("--configs", type=_name_list, default=list(DEFAULT_PREFILL_CONFIGS), metavar="SPEC,...",
                        help=f"KV configs (default {','.join(DEFAULT_PREFILL_CONFIGS)})")
    parser.add_argument("--only", action="append", metavar="CONFIG@N,N",
                        help="measure CONFIG at these contexts only (default: "
                             + " ".join(f"{k}@{','.join(map(str, v))}" for k, v in DEFAULT_ONLY_AT.items()) + ")")
    parser.add_argument("--steps", type=token_list_arg, default=[DEFAULT_PREFILL_STEP_SIZE], metavar="N,N,...",
                        help=f"prefill step sizes, prompt tokens per forward pass (default {DEFAULT_PREFILL_STEP_SIZE})")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every run, interleaved (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine/versions to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as markdown to FILE")
    args = parser.parse_args(argv)
    try:
        check_output_path(args.json, "--json")
        check_output_path(args.markdown, "--markdown")
        only_at = _only_at(args.only) if args.only else DEFAULT_ONLY_AT
        planned = len(_plan(resolve_configs(args.configs), sorted(set(args.contexts)), list(dict.fromkeys(args.steps)),
                            only_at))
        model, _ = mlxkv.load(args.model)
        with progress(total=prefill_runs_count(planned, args.rounds), desc="prefill bench", unit="run") as bar:
            def advance(label: str) -> None:
                bar.set_postfix_str(label, refresh=False)
                bar.update(1)

            rows = run_prefill_bench(model, args.configs, args.contexts, args.rounds, args.steps, only_at,
                                     args.seed, advance)
    except UserError as e:
        print(f"prefill_memory_bench: error: {e}", file=sys.stderr)
        return 2
    shown = [{**r, "spread": f"{r['prefill_tps_min']:.3g}-{r['prefill_tps_max']:.3g}",
              "peak_over_weights_mib": (r["peak_bytes"] - r["weights_bytes"]) / MIB,
              "kv_mib": r["kv_bytes"] / MIB, "transient_mib": r["transient_bytes"] / MIB} for r in rows]
    metadata = run_metadata(["python", *sys.argv], rounds=args.rounds, contexts=args.contexts, steps=args.steps,
                            configs=args.configs, only_at=only_at)
    m = metadata["machine"]
    about = (f"weights {rows[0]['weights_bytes'] / MIB:.0f} MiB; {m['machine']} {m['chip']}, {m['device']}, "
             f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}")
    columns, headers = zip(*COLUMNS)
    print("\n".join([about, "", text_table(shown, columns, headers), "", NOTES]))
    if args.json:
        write_json(args.json, rows, metadata)
    if args.markdown:
        write_text(args.markdown, "\n".join([
            "# Prefill memory", "", f"Command: `{metadata['command']}`  ", f"Date: {metadata['date']}  ",
            about, "", markdown_table(shown, columns, headers), "", NOTES, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
