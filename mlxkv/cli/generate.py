"""mlxkv generate: stream text from a model with a small, bounded KV cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxkv.cli.common import (
    HelpFormatter, add_distributed_arguments, add_generation_arguments, add_model_argument, check_context,
    encode_chat, load_model, messages_for, note, sampling_from_args, size_arg,
)
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog, request_from_args
from mlxkv.errors import UserError

DEFAULT_PROMPT = "What is the capital of France?"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a quantized / bounded KV cache",
        description="Generate text, streaming it to stdout; statistics go to stderr.",
        epilog="Example:\n  mlxkv generate --prompt 'Tell me about Paris' --kv-bits 4 --max-kv 4096\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT,
                   help=f"the prompt; '-' reads it from stdin (default: {DEFAULT_PROMPT!r})")
    add_generation_arguments(p)
    p.add_argument("--prompt-cache", metavar="FILE.safetensors",
                   help="reuse the longest prefix of the prompt saved in FILE, then save this prompt's cache "
                        "there (as llama.cpp's --prompt-cache)")
    add_kv_arguments(p)
    mem = p.add_argument_group("memory")
    mem.add_argument("--memory", metavar="SIZE", type=size_arg,
                     help="budget for --kv-bits auto, e.g. 8GB (default: this machine's recommended working set)")
    mem.add_argument("--memory-report", metavar="FILE",
                     help="record memory per step (tokens, KV bytes per layer, MLX active/peak/cache, time) "
                          "to FILE.json or FILE.csv")
    mem.add_argument("--memory-plot", metavar="FILE.png",
                     help="plot memory over tokens to FILE.png (needs matplotlib: pip install 'mlxkv[plot]')")
    mem.add_argument("--memory-compare", metavar="REPORT", nargs="+", default=[],
                     help="earlier --memory-report files drawn on the same --memory-plot (needs --memory-plot)")
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def read_prompt(text: str) -> str:
    prompt = sys.stdin.read() if text == "-" else text
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT, or pipe text in with --prompt -")
    return prompt


def check_outputs(args: argparse.Namespace) -> None:
    """Every file the run will write, checked before the model loads."""
    from mlxkv.caches.prompt_cache import check_prompt_cache_path
    from mlxkv.memory import load_memory_run, report_format
    from mlxkv.report import check_output_path, check_plot_path

    if args.prompt_cache:
        check_prompt_cache_path(args.prompt_cache)
        check_output_path(args.prompt_cache, "--prompt-cache")
    if args.memory_report:
        check_output_path(args.memory_report, "--memory-report")
        report_format(args.memory_report, "--memory-report")
    if args.memory_compare and not args.memory_plot:
        raise UserError("--memory-compare draws earlier reports on --memory-plot; add --memory-plot FILE.png")
    for path in args.memory_compare:
        load_memory_run(path)
    check_plot_path(args.memory_plot, "--memory-plot")


def check_distributed(args: argparse.Namespace) -> None:
    """Under mlx.launch: refuse what a group cannot do (before loading)."""
    from mlxkv.distributed import raise_once, start

    if start() is None:
        return
    if args.prompt == "-":
        raise_once(UserError("under mlx.launch stdin never ends (mlx.launch keeps it open for every rank); "
                             "pass the prompt with --prompt TEXT"))
    if args.prompt_cache:
        raise_once(UserError("--prompt-cache saves one process's cache, and under mlx.launch each rank holds only "
                             "its share of the heads; drop --prompt-cache"))


def run(args: argparse.Namespace) -> int:
    from mlxkv import distributed

    request = request_from_args(args)  # everything that can be checked is checked before loading
    params = sampling_from_args(args)
    check_distributed(args)
    prompt = read_prompt(args.prompt)
    check_outputs(args)

    model, tokenizer, model_id = load_model(args)
    sharding = distributed.setup(model, args)
    if sharding.active:
        note(sharding.describe())
    tokens = encode_chat(tokenizer, messages_for(prompt, args.system), not args.no_chat_template)
    check_context(model, len(tokens), params.max_tokens)
    config = request.resolve(model, context=len(tokens) + params.max_tokens,
                             memory=distributed.agreed_budget(args.memory), note=note,
                             prefill_step=args.prefill_step_size)
    distributed.check_config(sharding, config)
    if config.max_kv is not None and len(tokens) > config.max_kv:
        note(f"the prompt ({len(tokens)} tokens) is longer than the window ({config.max_kv}); the model "
             f"sees its first {config.sinks} and last {config.max_kv - config.sinks} tokens (raise --sinks to "
             "keep all of a system message or instructions: QUALITY.md, H2O against the window)")
    note(f"KV cache: {config.describe()}")
    session = open_session(model, tokenizer, config, args, model_id)

    tracker = None
    if args.memory_report or args.memory_plot:
        from mlxkv.memory import MemoryTracker

        tracker = MemoryTracker(session.cache, label=args.kv_config or config.describe(), model=model,
                                kv_config=config.describe(), model_name=model_id).start(reset_peak=False)
    try:
        logits = session.prefill(tokens, on_prefill=(lambda done, total: tracker.step()) if tracker else None)
        if args.prompt_cache:
            save_prompt_cache(session, args.prompt_cache, config, model_id)
        for token in session.decode(logits, params):
            print(token.text, end="", flush=True)
            if tracker:
                tracker.step()
    except KeyboardInterrupt:
        print(flush=True)
        note(f"interrupted: {session.stats.summary()}")
        return 130
    print(flush=True)
    note(session.stats.summary())
    if sharding.active:  # every rank takes part; rank 0 prints
        ranks = distributed.gather_memory(session.stats.kv.allocated, session.stats.peak_bytes)
        note(distributed.memory_line(ranks))
        if tracker:
            tracker.run.info["ranks"] = [vars(r) for r in ranks]
    if tracker and distributed.is_main():
        tracker.attach(session.cache)
        save_memory(tracker, args)
    return 0


def open_session(model, tokenizer, config, args: argparse.Namespace, model_id: str):
    """A session on a fresh cache, or on the cache saved in --prompt-cache when it exists."""
    from mlxkv.caches.prompt_cache import PromptCacheFile
    from mlxkv.engine import Session

    if args.prompt_cache and Path(args.prompt_cache).exists():
        cache, held = PromptCacheFile(Path(args.prompt_cache)).load(config, model_id)
        return Session(model, tokenizer, config, prefill_step_size=args.prefill_step_size, cache=cache, tokens=held)
    return Session(model, tokenizer, config, prefill_step_size=args.prefill_step_size)


def save_prompt_cache(session, path: str, config, model_id: str) -> None:
    from mlxkv.caches.prompt_cache import PromptCacheFile

    stats = session.stats
    PromptCacheFile(Path(path)).save(session.cache, session.tokens, config, model_id=model_id)
    note(f"prompt cache {path}: reused {stats.reused_tokens} of {stats.prompt_tokens} prompt tokens, "
         f"saved {len(session.tokens)}")


def save_memory(tracker, args: argparse.Namespace) -> None:
    if args.memory_report:
        tracker.save(args.memory_report)
        note(f"memory report: {args.memory_report}")
    if args.memory_plot:
        from mlxkv.memory import load_memory_run, plot_memory_runs

        plot_memory_runs([*(load_memory_run(p) for p in args.memory_compare), tracker.run], args.memory_plot)
        note(f"memory plot: {args.memory_plot}")
    note(tracker.summary())
