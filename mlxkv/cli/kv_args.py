"""The KV-cache flags every command takes, read through the one config parser.

Single-config commands (generate, chat, serve) take ``--kv-config SPEC`` plus field flags;
multi-config commands (bench, eval, plan) take ``--configs SPEC,SPEC,...`` and apply the
same field flags to each. Every value goes through ``mlxkv.config.spec.FIELD_PARSERS``,
the same parsers spec strings use, so ``--max-kv 4k`` and ``q4:max_kv=4k`` mean the same.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mlxkv.config.request import AUTO, KVRequest
from mlxkv.config.spec import FIELD_PARSERS, parse_bits, parse_spec, split_specs
from mlxkv.errors import UserError
from mlxkv.schemes import help_table

# flag -> (field, help). Values are parsed by FIELD_PARSERS[field].
FIELD_FLAGS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("--kv-group-size",), "group_size", "elements per scale/bias group: 32, 64 or 128 (default 64)"),
    (("--k-bits",), "k_bits", "bits for keys only (e.g. 8 with --v-bits 4; 16 = full precision)"),
    (("--v-bits",), "v_bits", "bits for values only (16 = full precision)"),
    (("--max-kv", "--max-kv-size"), "max_kv",
     "bound the cache to this many tokens (e.g. 4096 or 4k): the first --sinks tokens plus the most recent ones"),
    (("--sinks",), "sinks", "first tokens (attention sinks) a --max-kv window never evicts and a quantized cache "
                            "keeps in 16-bit (default 4)"),
    (("--kv-evict",), "evict", "what a --max-kv budget keeps: 'window' (default) the sinks plus the most recent "
                               "tokens; 'h2o' the sinks, the newest --kv-residual tokens (default: half the budget) "
                               "and the older tokens that received the most attention (heavy hitters)"),
    (("--quantized-kv-start",), "quantized_kv_start",
     "keep full precision until the cache holds this many tokens (default 0)"),
    (("--kv-residual",), "residual", "newest tokens kept in 16-bit beside the packed cache (default 32; with "
                                     "--kv-evict h2o, half of --max-kv)"),
    (("--kv-mode",), "mode", "affine (default) or one of MLX's microscaling formats mxfp4, nvfp4, mxfp8"),
    (("--kv-adaptive",), "adaptive", "context-adaptive precision: full precision, then TOKENS:BITS steps, "
                                     "e.g. '1k:8,4k:4'"),
    (("--kv-bits-map",), "layer_bits", "per-layer bits, e.g. '0:8,-1:8' (negative layers count from the end; "
                                       "16 = full precision)"),
    (("--kv-window-bits",), "window_bits", "bits of the model's own sliding-window layers (Gemma 3's local layers): "
                                           "2-8, or 16 = full precision as mlx-lm keeps them (default 8 on a "
                                           "quantized cache: measured best for the bytes, QUALITY.md); 'same' = "
                                           "like the other layers"),
)
BOOL_FLAGS = (
    ("--kv-rotate", "rotate", "Hadamard-rotate keys/queries and values before quantizing (spreads outliers)"),
    ("--per-channel-keys", "per_channel_keys", "quantize keys per channel over groups of tokens (KIVI)"),
)


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a field parser: its UserError becomes argparse's one-line error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _kv_bits(text: str) -> int | str:
    return AUTO if text.strip().lower() == AUTO else parse_bits(text, "--kv-bits")


def add_kv_arguments(parser: argparse.ArgumentParser, multi: bool = False, auto: bool = True) -> None:
    """The KV flags. ``multi``: ``--configs`` lists several specs and the flags apply to each."""
    kv = parser.add_argument_group(
        "KV cache",
        ("Each config in --configs is a name (listed below) or a spec string NAME:FIELD=VALUE:... "
         "(e.g. q4:residual=64); the flags below apply to every one of them."
         if multi else
         "A plain --kv-bits N takes the best measured scheme at N bits (see QUALITY.md); --kv-config takes "
         "a name (listed below) or a spec string NAME:FIELD=VALUE:... (e.g. q4:residual=64); the other flags "
         "set single fields. Without any, the cache is full precision."),
    )
    if not multi:
        kv.add_argument("--kv-config", metavar="SPEC", type=_typed(lambda t: (parse_spec(t), t)[1]),
                        help="a named configuration or spec string (see the list below)")
    bits_help = "bits per element for keys and values: 2, 3, 4, 5, 6 or 8 (16 = full precision)"
    if auto and not multi:
        bits_help += ("; 'auto': the best measured configuration that fits the prompt + --max-tokens in "
                      "--memory")
    kv.add_argument("--kv-bits", type=_typed(_kv_bits), metavar="BITS", help=bits_help)
    for flags, name, text in FIELD_FLAGS:
        kv.add_argument(*flags, dest=name, type=_typed(FIELD_PARSERS[name]), metavar=name.upper(), help=text)
    for flag, name, text in BOOL_FLAGS:
        kv.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)


def kv_epilog() -> str:
    return "KV configs (for --kv-config / --configs; add overrides as NAME:FIELD=VALUE):\n" + help_table()


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the user set with flags (typed values), nothing else."""
    names = [name for _, name, _ in FIELD_FLAGS] + [name for _, name, _ in BOOL_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def request_from_args(args: argparse.Namespace) -> KVRequest:
    """Single-config commands: what the flags ask for, checked (UserError) before any loading."""
    request = KVRequest(getattr(args, "kv_config", None), args.kv_bits, overrides_from_args(args))
    request.check()
    return request


def specs_from_args(args: argparse.Namespace, configs: str | list[str]) -> list[str]:
    """Multi-config commands: the spec strings with the flags appended as overrides, so each
    label says what ran (``q4`` + ``--max-kv 512`` -> ``q4:max_kv=512``). Checked here."""
    overrides = overrides_from_args(args)
    if args.kv_bits not in (None, AUTO):
        overrides["bits"] = args.kv_bits
    elif args.kv_bits == AUTO:
        raise UserError("--kv-bits auto chooses one configuration; it does not apply to --configs")
    specs = split_specs(configs) if isinstance(configs, str) else list(configs)
    if not specs:
        raise UserError(f"no KV configs given; choose from {help_table().split()[0]}, ...")
    suffix = "".join(f":{name}={_as_text(value)}" for name, value in overrides.items())
    result = []
    for spec in specs:
        if suffix:
            spec = spec + suffix
        parse_spec(spec)
        result.append(spec)
    return list(dict.fromkeys(result))


def _as_text(value: Any) -> str:
    """A typed value back in spec-string form."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return "/".join(f"{a}@{b}" for a, b in value)
    return str(value)
