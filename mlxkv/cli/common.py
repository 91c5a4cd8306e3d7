"""What several commands share on the command line: the model, sampling flags, prompts, notes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mlxkv.engine.prompts import encode_chat, messages_for  # noqa: F401  (the CLI's names)
from mlxkv.errors import UserError

from mlxkv.loading.models import MODEL_HELP


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks and indented lines (the list of KV
    configs, examples), while prose lines are wrapped to the terminal like argparse's own."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(line if line[:1].isspace() or not line else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                       break_on_hyphens=False)
                         for line in text.splitlines())


def note(text: str) -> None:
    """Progress and statistics go to stderr, so stdout stays clean for pipes; under mlx.launch
    only rank 0 speaks."""
    from mlxkv.distributed import is_main

    if is_main():
        print(f"[mlxkv] {text}", file=sys.stderr, flush=True)


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--keep-quantized-weights", action="store_true",
                   help="on a CPU device, keep packed weights instead of dequantizing them to float32 "
                        "(less memory, several times slower there)")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for runs over several machines (``mlx.launch``); see ``mlxkv.distributed``."""
    from mlxkv.distributed import H2O_CAVEAT, PIPELINE_HELP

    group = p.add_argument_group(
        "several machines",
        "Started with mlx.launch (e.g. mlx.launch --backend ring --hostfile hosts.json -- mlxkv ...), the model "
        "is split over the ranks as mlx-lm does: tensor parallel by default, each rank holding its share of "
        "every layer's KV heads in its own cache (any KV config); rank 0 prints. " + H2O_CAVEAT + ".")
    group.add_argument("--pipeline", action="store_true", help=PIPELINE_HELP)


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, model id) with the load note printed (by rank 0 under mlx.launch)."""
    import mlxkv
    from mlxkv.distributed import start
    from mlxkv.loading import load_info

    start()  # under mlx.launch: join the group first, so only rank 0 prints from here on

    model, tokenizer = mlxkv.load(args.model, keep_quantized=getattr(args, "keep_quantized_weights", False) or None)
    info = load_info(model)
    if info is not None:
        note(info.note)
    return model, tokenizer, str(info.source if info is not None else args.model)


def tokens_arg(text: str) -> int:
    """argparse type for a token count: '4096', '4k', '32,768' (mlxkv.units.parse_tokens)."""
    from mlxkv.units import parse_tokens

    try:
        return parse_tokens(text, "number of tokens")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_arg(text: str) -> int:
    """argparse type for a memory size: '8GB', '512MB' (mlxkv.units.parse_bytes: powers of 1024, a unit
    required), so a bad size fails before anything loads and the message names the flag."""
    from mlxkv.units import parse_bytes

    try:
        return parse_bytes(text, "size")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def count_arg(flag: str, minimum: int = 1):
    """argparse type for a count such as --trials: a whole number >= ``minimum`` (errors.at_least)."""
    from mlxkv.errors import at_least

    def parse(text: str) -> int:
        try:
            return at_least(int(text), minimum, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if isinstance(e, UserError) else
                                             f"{flag} takes a whole number, got {text!r}") from None

    return parse


def token_list_arg(text: str) -> list[int]:
    """argparse type for token counts: '1024,4k,8k'."""
    values = [tokens_arg(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one number of tokens, e.g. 1024,4k")
    return values


def add_generation_arguments(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    """mlx-lm's sampling and prefill flags."""
    from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

    p.add_argument("--max-tokens", "-m", type=tokens_arg, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature, >= 0; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--prefill-step-size", type=tokens_arg, default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt tokens per forward pass (default {DEFAULT_PREFILL_STEP_SIZE}, as mlx-lm)")
    p.add_argument("--system", help="a system message for the chat template")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")


def sampling_from_args(args: argparse.Namespace):
    """SamplingParams from the flags; a bad value is a one-line error naming the flag."""
    from mlxkv.engine import SamplingParams

    names = {"temperature": "--temp", "top_p": "--top-p", "max_tokens": "--max-tokens", "seed": "--seed"}
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, seed=args.seed)
    except UserError as e:
        text = str(e)
        for field, flag in names.items():
            text = text.replace(f"{field} ", f"{flag} ", 1) if text.startswith(field) else text
        raise UserError(text) from None


def check_context(model: Any, prompt_tokens: int, max_tokens: int) -> None:
    """A prompt past the model's trained context is refused; one whose answer runs past it is noted."""
    trained = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    if not trained:
        return
    if prompt_tokens > trained:
        raise UserError(f"the prompt has {prompt_tokens:,} tokens, more than this model's trained context of "
                        f"{trained:,}; shorten it")
    if prompt_tokens + max_tokens > trained:
        note(f"the prompt ({prompt_tokens:,} tokens) plus --max-tokens {max_tokens:,} runs past the model's "
             f"trained context of {trained:,} tokens; the answer may degrade there")
