"""mlxkv generate: stream text from a model with a small, bounded KV cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxkv.config import EVICTIONS, MODES, KVConfig, parse_adaptive, parse_layer_bits
from mlxkv.errors import UserError
from mlxkv.loading.models import MODEL_HELP


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    """The KV-cache flags (mlx-lm's names where they overlap), shared by every command that builds caches."""
    kv = parser.add_argument_group(
        "KV cache",
        "Start from a named configuration (--kv-config) and/or set fields. "
        "Without any, the cache is full precision.",
    )
    kv.add_argument("--kv-config", metavar="NAME", help="named configuration: " + ", ".join(KVConfig.names()))
    kv.add_argument("--kv-bits", type=_bits_arg, metavar="BITS",
                    help="bits per element for keys and values: 2, 3, 4, 5, 6 or 8; or 'auto' (generate): "
                         "the best configuration the planner says fits --max-tokens + prompt in --memory")
    kv.add_argument("--kv-group-size", type=int, metavar="N", help="elements per scale/bias group: 32, 64 or 128 (default 64)")
    kv.add_argument("--k-bits", type=int, metavar="BITS", help="bits for keys only (e.g. 8 with --v-bits 4)")
    kv.add_argument("--v-bits", type=int, metavar="BITS", help="bits for values only")
    kv.add_argument("--max-kv", "--max-kv-size", dest="max_kv", type=int, metavar="TOKENS",
                    help="bound the cache to a window of this many tokens: the first --sinks tokens plus the most recent ones")
    kv.add_argument("--sinks", type=int, metavar="N",
                    help="first tokens (attention sinks) a --max-kv window never evicts and a quantized cache keeps "
                         "in 16-bit (default 4)")
    kv.add_argument("--kv-evict", choices=EVICTIONS,
                    help="what a --max-kv budget keeps: 'window' (default) the sinks plus the most recent tokens; "
                         "'h2o' the sinks, the newest --kv-residual tokens (default: half the budget) and the older "
                         "tokens that received the most attention (heavy hitters), --max-kv tokens in all")
    kv.add_argument("--quantized-kv-start", type=int, metavar="TOKENS",
                    help="keep full precision until the cache holds this many tokens (default 0)")
    kv.add_argument("--kv-residual", type=int, metavar="TOKENS",
                    help="newest tokens kept in 16-bit beside the packed cache (default 32; with --kv-evict h2o, "
                         "half of --max-kv)")
    kv.add_argument("--kv-mode", choices=MODES, help="affine (default) or one of MLX's microscaling formats")
    kv.add_argument("--kv-rotate", action=argparse.BooleanOptionalAction, default=None,
                    help="Hadamard-rotate keys/queries and values before quantizing (spreads outliers); on by default "
                         "with a plain --kv-bits, together with --per-channel-keys (see QUALITY.md)")
    kv.add_argument("--per-channel-keys", action=argparse.BooleanOptionalAction, default=None,
                    help="quantize keys per channel over groups of tokens (KIVI); on by default with a plain --kv-bits")
    kv.add_argument("--kv-adaptive", metavar="STEPS",
                    help="context-adaptive precision: full precision, then TOKENS:BITS steps, e.g. '1024:8,4096:4'")
    kv.add_argument("--kv-bits-map", metavar="MAP",
                    help="per-layer bits, e.g. '0:8,-1:8' (negative layers count from the end; 0 bits = full precision)")


def _bits_arg(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kv-bits takes a number of bits (2-8), not {text!r}") from None


def kv_config_from_args(args: argparse.Namespace) -> KVConfig:
    """KVConfig from the flags of ``add_kv_arguments``: the named config, then explicit fields."""
    fields = {
        "bits": None if args.kv_bits == "auto" else args.kv_bits,
        "group_size": args.kv_group_size,
        "k_bits": args.k_bits,
        "v_bits": args.v_bits,
        "max_kv": args.max_kv,
        "sinks": args.sinks,
        "quantized_kv_start": args.quantized_kv_start,
        "residual": args.kv_residual,
        "mode": args.kv_mode,
        "rotate": args.kv_rotate,
        "per_channel_keys": args.per_channel_keys,
        "layer_bits": parse_layer_bits(args.kv_bits_map) if args.kv_bits_map else None,
        "adaptive": parse_adaptive(args.kv_adaptive) if args.kv_adaptive else None,
        "evict": args.kv_evict,
    }
    overrides = {k: v for k, v in fields.items() if v is not None}
    if args.kv_config:
        return KVConfig.from_name(args.kv_config, **overrides)
    return KVConfig(**overrides)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a quantized / bounded KV cache",
        description="Generate text, streaming it to stdout; statistics go to stderr.",
        epilog="Example: mlxkv generate --prompt 'Tell me about Paris' --kv-bits 4 --max-kv 4096",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--prompt", "-p", default="What is the capital of France?", help="the prompt; '-' reads it from stdin")
    p.add_argument("--system", help="a system message for the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--keep-quantized-weights", action="store_true",
                   help="on a CPU device, keep packed weights instead of dequantizing them to float32 "
                        "(less memory, several times slower there)")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="reuse the prompt prefix saved in FILE; if FILE does not exist, save the prompt's cache there")
    add_kv_arguments(p)
    mem = p.add_argument_group("memory")
    mem.add_argument("--memory", metavar="SIZE",
                     help="budget for --kv-bits auto, e.g. 8GB (default: this machine's recommended working set)")
    mem.add_argument("--memory-report", metavar="FILE",
                     help="record memory per step (tokens, KV bytes per layer, MLX active/peak/cache, time) to FILE.json or FILE.csv")
    mem.add_argument("--memory-plot", metavar="FILE",
                     help="plot memory over tokens to FILE.png (needs matplotlib: pip install 'mlxkv[plot]')")
    mem.add_argument("--memory-compare", metavar="REPORT", nargs="+", default=[],
                     help="earlier --memory-report files drawn on the same --memory-plot (e.g. fp16 vs 4-bit vs a window)")
    p.set_defaults(run=run)


def read_prompt(text: str) -> str:
    prompt = sys.stdin.read() if text == "-" else text
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT, or pipe text in with --prompt -")
    return prompt


def encode_prompt(tokenizer, prompt: str, system: str | None, chat_template: bool) -> list[int]:
    """Token ids for the prompt, through the model's chat template when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    if system:
        prompt = f"{system}\n\n{prompt}"
    return list(tokenizer.encode(prompt))


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    import mlxkv

    # Everything that can be checked before loading the model is checked first.
    config = kv_config_from_args(args)
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    prompt = read_prompt(args.prompt)
    if args.memory_report:
        from mlxkv.memory import report_format

        report_format(args.memory_report)
    if args.memory_plot:
        from mlxkv.report import require_pyplot

        require_pyplot()
    if args.seed is not None:
        mx.random.seed(args.seed)

    model, tokenizer = mlxkv.load(args.model, keep_quantized=args.keep_quantized_weights or None)
    info = getattr(model, "mlxkv_load_info", None) or {}
    model_id = str(info.get("source", args.model))
    if info.get("note"):
        note(info["note"])
    tokens = encode_prompt(tokenizer, prompt, args.system, not args.no_chat_template)
    if args.kv_bits == "auto":
        config = auto_config(model, args, len(tokens) + args.max_tokens)
    config = with_default_scheme(config, args, model)
    cache, to_feed = prepare_cache(model, config, tokens, args.prompt_cache, model_id)

    tracker = None
    if args.memory_report or args.memory_plot:
        from mlxkv.memory import MemoryTracker

        tracker = MemoryTracker(cache, label=args.kv_config or config.describe(), model=model,
                                kv_config=config.describe(), model_name=model_id).start()

    response = None
    for response in stream_generate(
        model, tokenizer, mx.array(to_feed), max_tokens=args.max_tokens,
        sampler=make_sampler(temp=args.temp, top_p=args.top_p), prompt_cache=cache,
        prompt_progress_callback=(lambda done, total: tracker.step()) if tracker else None,
    ):
        print(response.text, end="", flush=True)
        if tracker:
            tracker.step()
    print(flush=True)
    if response is not None:
        report_run(response, model, cache, config)
    if tracker:
        save_memory(tracker, args)
    return 0


def with_default_scheme(config: KVConfig, args: argparse.Namespace, model) -> KVConfig:
    """A plain --kv-bits N gets the best scheme measured at those bits: keys per channel
    (KIVI) and Hadamard rotation. On the default model at 4 bits: KL divergence 0.0015
    against 0.0093 plain (QUALITY.md), and MLX's faster quantized matmul for the scores.
    Left alone when the user chose a scheme or a named config, or the model cannot use it."""
    from mlxkv.caches.factory import model_head_dim
    from mlxkv.config import hadamard_size

    chose = (args.kv_config or args.kv_rotate is not None or args.per_channel_keys is not None
             or args.kv_mode or config.backend != "mlxkv" or config.evict != "window")
    head_dim = model_head_dim(model)
    if isinstance(args.kv_bits, int) and not chose and head_dim and hadamard_size(head_dim):
        return config.replace(rotate=True, per_channel_keys=True)
    return config


def note(text: str) -> None:
    """Progress and statistics go to stderr, so stdout stays clean for pipes."""
    print(f"[mlxkv] {text}", file=sys.stderr)


def auto_config(model, args: argparse.Namespace, context: int) -> KVConfig:
    """--kv-bits auto: the planner's best configuration for this context and budget."""
    from mlxkv.memory import recommend_config

    overrides = {"group_size": args.kv_group_size, "max_kv": args.max_kv, "sinks": args.sinks,
                 "residual": args.kv_residual, "quantized_kv_start": args.quantized_kv_start}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    name, reason = recommend_config(model, context, args.memory, **overrides)
    note(f"--kv-bits auto: {reason}")
    return KVConfig.from_name(name, **overrides)


def prepare_cache(model, config: KVConfig, tokens: list[int], prompt_cache: str | None,
                  model_id: str) -> tuple[list, list[int]]:
    """The per-layer caches and the tokens still to feed: a saved prefix is reused, or the
    prompt's cache is saved for next time when --prompt-cache names a new file."""
    import mlxkv
    from mlxkv.caches.prompt_cache import PromptCacheFile
    from mlxkv.stepping import prefill

    cache, to_feed = mlxkv.make_kv_cache(model, config), tokens
    saved = PromptCacheFile(Path(prompt_cache)) if prompt_cache else None
    if saved is not None and saved.path.exists():
        cache, to_feed = saved.reuse(tokens, config, model_id=model_id)
        note(f"reused {len(tokens) - len(to_feed)} cached prompt tokens from {saved.path}")
    if config.max_kv is not None and len(tokens) > config.max_kv:
        note(f"the prompt ({len(tokens)} tokens) is longer than the window ({config.max_kv}); the model "
             f"sees its first {config.sinks} and last {config.max_kv - config.sinks} tokens (raise --sinks to "
             "keep all of a system message or instructions: QUALITY.md, H2O against the window)")
    note(f"KV cache: {config.describe()}")
    if saved is not None and not saved.path.exists():
        # All but the prompt's last token, which generation needs to start from.
        if len(to_feed) > 1:
            prefill(model, to_feed[:-1], cache)
        saved.save(cache, tokens[:-1], config, model_id=model_id)
        to_feed = to_feed[-1:]
        note(f"saved the prompt's cache to {saved.path}")
    return cache, to_feed


def report_run(response, model, cache: list, config: KVConfig) -> None:
    """Speed, peak memory, and KV bytes next to what an fp16 cache would hold."""
    from mlxkv.memory import format_bytes, layer_kv_bytes, layout_from_model, predict_kv_bytes

    kv_bytes = sum(layer_kv_bytes(cache))
    tokens = max((getattr(c, "offset", 0) for c in cache), default=0)
    fp16 = predict_kv_bytes("fp16", layout_from_model(model), tokens, dtype_bytes=2)  # allocated, like ours
    ratio = f" ({kv_bytes / fp16:.2f}x of fp16's {format_bytes(fp16)})" if fp16 else ""
    note(
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s | "
        f"peak memory: {format_bytes(response.peak_memory * 1e9)} | KV cache: {format_bytes(kv_bytes)}{ratio}"
    )


def save_memory(tracker, args: argparse.Namespace) -> None:
    if args.memory_report:
        tracker.save(args.memory_report)
        note(f"memory report: {args.memory_report}")
    if args.memory_plot:
        from mlxkv.memory import load_memory_run, plot_memory_runs

        plot_memory_runs([*(load_memory_run(p) for p in args.memory_compare), tracker.run], args.memory_plot)
        note(f"memory plot: {args.memory_plot}")
    note(tracker.summary())
