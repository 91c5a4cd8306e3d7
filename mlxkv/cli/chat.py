"""mlxkv chat: a multi-turn conversation that keeps its quantized KV cache between turns.

As ``mlx_lm.chat``: type a message, get the answer; 'q' quits, 'r' starts over, 'h' helps.
Each turn reuses the cache of the conversation so far (only the new message is prefilled)
and prints a statistics line with the KV cache's size to stderr.
"""

from __future__ import annotations

import argparse
import sys

from mlxkv.cli.common import (
    HelpFormatter, add_distributed_arguments, add_generation_arguments, add_model_argument, encode_chat, load_model,
    note, sampling_from_args, size_arg,
)
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog, request_from_args

COMMANDS = "type a message; 'q' (or Ctrl-D) quits, 'r' resets the conversation, 'h' shows this help"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model, keeping the quantized KV cache between turns",
        description="A multi-turn chat in the terminal (as mlx_lm.chat). Each turn reuses the KV cache of "
                    "the conversation so far; statistics go to stderr. In the chat: " + COMMANDS + ".",
        epilog="Example:\n  mlxkv chat --kv-bits 4 --max-kv 8192\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    add_model_argument(p)
    add_generation_arguments(p, max_tokens=512)
    add_kv_arguments(p)
    p.add_argument("--memory", metavar="SIZE", type=size_arg, help="budget for --kv-bits auto, e.g. 8GB")
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mlxkv import distributed
    from mlxkv.engine import Session

    request = request_from_args(args)
    params = sampling_from_args(args)
    model, tokenizer, _ = load_model(args)
    sharding = distributed.setup(model, args)
    if sharding.active:  # mlx.launch sends what is typed to every rank, but never an end of input
        note(sharding.describe() + "; type 'q' to quit (Ctrl-D does not reach the ranks)")
    trained = getattr(getattr(model, "args", None), "max_position_embeddings", None) or 8192
    config = request.resolve(model, context=trained, memory=distributed.agreed_budget(args.memory), note=note,
                             prefill_step=args.prefill_step_size)
    distributed.check_config(sharding, config)
    note(f"KV cache: {config.describe()}")
    session = Session(model, tokenizer, config, prefill_step_size=args.prefill_step_size)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    note(COMMANDS)
    while True:
        try:
            text = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip().lower()
        if command in ("q", "quit", "exit"):
            return 0
        if command in ("r", "reset"):
            messages, _ = list(system), session.reset()
            note("conversation reset")
            continue
        if command in ("h", "help") or not command:
            note(COMMANDS)
            continue
        messages.append({"role": "user", "content": text})
        answer = []
        try:
            for token in session.generate(encode_chat(tokenizer, messages, not args.no_chat_template), params):
                print(token.text, end="", flush=True)
                answer.append(token.text)
        except KeyboardInterrupt:
            note("answer interrupted")
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
        note(session.stats.summary())
        if sharding.active:  # every rank takes part; rank 0 prints
            note(distributed.memory_line(distributed.gather_memory(session.stats.kv.allocated,
                                                                   session.stats.peak_bytes)))
