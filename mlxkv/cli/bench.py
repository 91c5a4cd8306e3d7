"""mlxkv bench: tokens/s and peak memory across KV configs and contexts, beside mlx-lm's caches."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxkv.bench.runner import DEFAULT_CONFIGS, DEFAULT_CONTEXTS, DEFAULT_PREFILL_CHUNK, PROMPT_NOTE
from mlxkv.cli.common import HelpFormatter, add_distributed_arguments, count_arg, token_list_arg
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog, specs_from_args
from mlxkv.loading import load_info
from mlxkv.loading.models import MODEL_HELP
from mlxkv.report import check_output_path
from mlxkv.units import MB, UNITS_NOTE

COLUMNS = (
    ("config", "config"),
    ("context", "context"),
    ("prefill_tps", "prefill tok/s"),
    ("prefill_tps_vs_baseline", "x mlx-lm"),
    ("decode_tps", "decode tok/s"),
    ("decode_spread", "min-max"),
    ("decode_tps_vs_baseline", "x mlx-lm"),
    ("decode_tps_vs_fp16", "x fp16"),
    ("peak_mb", "peak MB"),
    ("kv_mb", "KV MB"),
    ("kv_vs_fp16", "KV x fp16"),
    ("kv_bits_per_element", "bits/elt"),
    ("overhead_pct", "overhead %"),
)

NOTES = """\
Columns: tokens/s are medians over trials (min-max: decode spread). "x mlx-lm": ratio to
mlx-lm's cache with the same bits in this run (k8v4 against mlxlm-q8; mlx-lm rows: -).
"x fp16": decode ratio to the full-precision cache (ours if measured, else mlx-lm's).
peak: whole run, weights included. KV MB: what the caches allocate (mlx-lm's and ours
grow in steps of 256 tokens). bits/elt and "KV x fp16": bytes of the tokens held against
a 16-bit cache of them (2 bytes per element); on a CPU device the full-precision caches
actually hold float32 (32 bits/elt). overhead: decode peak - weights - KV MB, as % of
the 16-bit KV size (target <= 10%).
""" + UNITS_NOTE + "."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="tokens/s and peak memory of KV configs, beside mlx-lm's caches",
        description=(
            "Measure prefill and decode tokens/s, peak memory and KV bytes for each KV config at "
            "each context length, with mlx-lm's KVCache / QuantizedKVCache as baselines in the same "
            "process. Runs are interleaved (every trial visits every config) so a drifting machine "
            "affects all configs alike. Prompts are synthetic token ids."
        ),
        epilog="Example:\n  mlxkv bench --contexts 1024,4096 --configs fp16,q4,mlxlm-fp16,mlxlm-q4 "
        "--json bench.json --plot bench.png\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", help=MODEL_HELP)
    add_bench_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def add_bench_arguments(p: argparse.ArgumentParser, contexts: Sequence[int] = DEFAULT_CONTEXTS) -> None:
    """Every option but the model: shared with scripts that bench a model built in code."""
    p.add_argument("--contexts", type=token_list_arg, default=list(contexts), metavar="N,N,...",
                   help=f"prompt lengths in tokens, e.g. 1024,4k,8k (default {','.join(map(str, contexts))})")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), metavar="SPEC,SPEC,...",
                   help="KV configs, listed below, each with optional field overrides such as q4:residual=64 "
                        f"(default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--gen-tokens", type=count_arg("--gen-tokens"), default=32, metavar="N",
                   help="greedy decode steps timed after each prefill (default 32)")
    p.add_argument("--trials", type=count_arg("--trials"), default=3, metavar="N", help="repeats of every run; medians are reported (default 3)")
    p.add_argument("--prefill-step-size", "--prefill-chunk", dest="prefill_chunk", type=count_arg("--prefill-step-size"),
                   default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens per forward pass, the same for every config (default {DEFAULT_PREFILL_CHUNK}; "
                        "mlx-lm's generate uses 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompt (default 0)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the short untimed run of each config before measuring")
    p.add_argument("--json", metavar="FILE", help="write the rows and the machine/versions to FILE")
    p.add_argument("--markdown", metavar="FILE", help="write the table as markdown to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="plot tokens/s and memory against context to FILE (needs matplotlib)")
    add_kv_arguments(p, multi=True)


def display_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the derived cells the tables show (MB, spread, percent)."""
    shown = []
    for r in rows:
        overhead = r.get("decode_overhead_vs_fp16_kv")
        shown.append({
            **r,
            "decode_spread": f"{r['decode_tps_min']:.3g}-{r['decode_tps_max']:.3g}",
            "peak_mb": r["peak_memory_bytes"] / MB,
            "kv_mb": r["kv_bytes"] / MB,
            "overhead_pct": None if overhead is None else 100 * overhead,
        })
    return shown


def render(rows: Sequence[dict[str, Any]], metadata: dict[str, Any], markdown: bool) -> str:
    """The table with what it takes to read it: model, prompt, sizes, machine."""
    from mlxkv.report import markdown_table, text_table

    columns, headers = zip(*COLUMNS)
    shown = display_rows(rows)
    table = (markdown_table if markdown else text_table)(shown, columns, headers, digits=3)
    m = metadata["machine"]
    about = [
        f"model: {metadata['model']}",
        f"{metadata['prompt']}; prefill in chunks of {metadata['prefill_chunk']} tokens; "
        f"{metadata['gen_tokens']} greedy decode steps; {metadata['trials']} trials, interleaved",
        f"machine: {m['machine']} {m['chip']}, {m['os']}, {m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}",
    ]
    if metadata.get("ranks", 1) > 1:
        about.append(f"ranks: {metadata['ranks']} ({metadata['sharding']} parallel); the table shows rank 0, "
                     "the per-rank table every rank")
        table += "\n\n" + rank_table(shown, markdown)
    if not markdown:
        return "\n".join([*about, "", table, "", NOTES])
    return "\n".join([
        "# mlxkv bench", "",
        f"Command: `{metadata['command']}`  ", f"Date: {metadata['date']}  ",
        *(f"{line}  " for line in about), "", table, "", NOTES, "",
    ])


def rank_table(rows: Sequence[dict[str, Any]], markdown: bool) -> str:
    """KV bytes and peak memory of every rank, for a run under mlx.launch."""
    from mlxkv.report import markdown_table, text_table

    shown = [{"config": r["config"], "context": r["context"],
              "kv": " / ".join(f"{b / MB:.3g}" for b in r["kv_bytes_per_rank"]),
              "peak": " / ".join(f"{b / MB:.4g}" for b in r["peak_memory_bytes_per_rank"])} for r in rows]
    return (markdown_table if markdown else text_table)(
        shown, ["config", "context", "kv", "peak"], ["config", "context", "KV MB per rank", "peak MB per rank"])


def run(args: argparse.Namespace) -> int:
    import mlxkv
    from mlxkv import distributed
    from mlxkv.bench.runner import resolve_configs

    check_arguments(args)
    distributed.start()
    model, _ = mlxkv.load(args.model)
    sharding = distributed.setup(model, args)
    for spec in resolve_configs(args.configs):
        distributed.check_config(sharding, spec.config)
    info = load_info(model)
    name = str(getattr(info, "source", None) or args.model or "default model")
    return bench_and_report(model, name, args, weights_dtype=getattr(info, "dtype", None))


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before loading a model: configs, trials, output paths, matplotlib."""
    from mlxkv.bench.runner import resolve_configs
    from mlxkv.report import check_plot_path

    args.configs = specs_from_args(args, args.configs)
    resolve_configs(args.configs)
    for path, option in ((args.json, "--json"), (args.markdown, "--markdown")):
        check_output_path(path, option)
    check_plot_path(args.plot, "--plot")


def bench_and_report(model: Any, model_name: str, args: argparse.Namespace, weights_dtype: str | None = None) -> int:
    """Run the bench with a progress bar, print the table, write the files asked for."""
    from mlxkv import distributed
    from mlxkv.bench.runner import check_contexts, resolve_configs, run_bench, runs_count
    from mlxkv.report import progress, run_metadata, write_json, write_text

    configs = resolve_configs(args.configs)
    check_contexts(model, args.contexts, args.gen_tokens)  # fail before any timing
    total = runs_count(len(configs), len(set(args.contexts)), args.trials, args.warmup)
    with progress(total=total, desc="bench", unit="run") as bar:
        def advance(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        rows = run_bench(
            model, configs, args.contexts, args.gen_tokens, args.trials,
            args.prefill_chunk, args.seed, args.warmup, advance,
        )
    sharding = distributed.sharding_of(model)
    if sharding.active:  # every rank takes part; rank 0 reports
        distributed.add_rank_columns(rows)
        if not sharding.main:
            return 0

    metadata = run_metadata(
        model=model_name,
        weights_dtype=weights_dtype,
        prompt=PROMPT_NOTE.format(seed=args.seed),
        prefill_chunk=args.prefill_chunk,
        gen_tokens=args.gen_tokens,
        trials=args.trials,
        contexts=args.contexts,
        configs=[spec.label for spec in configs],
        **({"ranks": sharding.size, "sharding": sharding.mode} if sharding.active else {}),
    )
    print(render(rows, metadata, markdown=False))
    if args.json:
        write_json(args.json, rows, metadata)
    if args.markdown:
        write_text(args.markdown, render(rows, metadata, markdown=True), "--markdown")
    if args.plot:
        from mlxkv.bench.plot import plot_rows

        m = metadata["machine"]
        title = f"{Path(model_name).name}: {m['chip']}, {m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}"
        plot_rows(rows, args.plot, title=title)
    for path in (args.json, args.markdown, args.plot):
        if path:
            print(f"[mlxkv] wrote {path}", file=sys.stderr)
    return 0
