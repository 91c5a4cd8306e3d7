"""Serving benchmark (issue 16 item 5): mlxkv serve on fp16, q8 and --kv-bits 4 beside
mlx_lm.server (16-bit with its batching, and --kv-bits 4), on the same float32 weights.

1, 4, 8 and 16 concurrent clients (official openai client, greedy, fixed prompts and
max_tokens), every server on 127.0.0.1, medians over repeats; and capacity: sessions each
KV config admits at a fixed budget and context, by the engine's admission rule.

    python scripts/serve_bench.py --repeats 3 --max-tokens 48 \\
        --json serve-bench.json --markdown serve-bench.md --plot docs/serve-bench.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.bench.serve_bench import (
    MLX_LM_SERVERS, MLXKV_CONFIGS, capacity_rows, plot, run_sweep, summarize, targets,
)
from mlxkv.bench.serve_servers import float32_model_dir, server_specs
from mlxkv.cli.common import token_list_arg, tokens_arg
from mlxkv.errors import UserError
from mlxkv.report import check_output_path, markdown_table, run_metadata, text_table, write_json, write_text
from mlxkv.units import format_bytes, parse_bytes

COLUMNS = (("server", "server"), ("clients", "clients"), ("aggregate_tps", "aggregate tok/s"),
           ("aggregate_min", "min"), ("aggregate_max", "max"), ("vs_one_client", "x 1 client"),
           ("vs_reference", "x mlx_lm kv4"), ("ttft_s", "TTFT s"), ("stream_tps", "tok/s per stream"))
CAPACITY_COLUMNS = (("config", "config"), ("describe", "scheme"), ("dtype", "weights"),
                    ("reserved_per_session", "bytes/session"), ("bytes_vs_fp16", "x fewer bytes"),
                    ("sessions", "sessions"), ("sessions_vs_fp16", "x fp16 sessions"))
EXTRA_CAPACITY = {"mxfp4-rot": "mxfp4-rot", "k4v3-rot": "k4v3-rot"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model (default: SmolLM2-135M-Instruct, the bundled GGUF)")
    p.add_argument("--workdir", default="/tmp/mlxkv-serve-bench", help="float32 weights and server logs")
    p.add_argument("--clients", type=token_list_arg, default=[1, 4, 8, 16], metavar="N,N,...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=tokens_arg, default=48)
    p.add_argument("--max-batch", type=int, default=16, help="both servers' decode batch (default 16)")
    p.add_argument("--capacity-tokens", type=token_list_arg, default=[4096, 8192], metavar="N,N,...",
                   help="tokens per conversation (prompt + max_tokens) for the capacity count")
    p.add_argument("--capacity-budget", default="4GB", help="KV budget for the capacity count (default 4GB)")
    p.add_argument("--skip-throughput", action="store_true", help="only count capacity")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    try:
        for path, option in ((args.json, "--json"), (args.markdown, "--markdown"), (args.plot, "--plot")):
            check_output_path(path, option)
        budget = parse_bytes(args.capacity_budget, "--capacity-budget")
        work = Path(args.workdir)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        model_dir = float32_model_dir(work / "model-f32", args.model)
        say(f"float32 weights: {model_dir}")

        capacity = [row for tokens in args.capacity_tokens
                    for row in capacity_rows(model_dir, tokens, budget, EXTRA_CAPACITY)]
        say(text_table(capacity, [c for c, _ in CAPACITY_COLUMNS], [h for _, h in CAPACITY_COLUMNS]))
        rows, warm, summary, goals, failures = [], {}, [], {}, []
        if not args.skip_throughput:
            specs = server_specs(model_dir, args.max_batch, MLXKV_CONFIGS, MLX_LM_SERVERS)
            rows, warm, failures = run_sweep(specs, args.clients, args.repeats, args.max_tokens, work / "logs", say)
            summary = summarize(rows)
            goals = targets(summary)
            say(text_table(summary, [c for c, _ in COLUMNS], [h for _, h in COLUMNS]))
            for label, text in warm.items():
                say(f"warm-up answer, {label}: {text!r}")
            say(f"targets at 8 clients: {goals}")
    except UserError as e:
        print(f"serve_bench: error: {e}", file=sys.stderr)
        return 2

    metadata = run_metadata(["python", "scripts/serve_bench.py", *sys.argv[1:]], model_dir=str(model_dir),
                            max_tokens=args.max_tokens, repeats=args.repeats, warm_up_answers=warm,
                            targets=goals, failures=failures, capacity=capacity, versions=versions())
    if args.json:
        write_json(args.json, [asdict(r) for r in rows] + [{"summary": s} for s in summary], metadata)
    if args.markdown:
        text = (markdown_table(summary, [c for c, _ in COLUMNS], [h for _, h in COLUMNS]) + "\n\n"
                + markdown_table(capacity, [c for c, _ in CAPACITY_COLUMNS], [h for _, h in CAPACITY_COLUMNS]) + "\n")
        write_text(args.markdown, text)
    if args.plot and summary:
        first = [c for c in capacity if c["tokens"] == args.capacity_tokens[0]]
        plot(summary, first, args.plot, f"SmolLM2-135M (float32 weights) on {metadata['machine'].get('cpu', 'CPU')}: "
             f"greedy, {args.max_tokens} tokens per request, median of {args.repeats} repeats; KV budget "
             f"{format_bytes(budget)}")
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("mlx", "mlx-lm", "mlxkv", "openai", "starlette", "uvicorn")}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
