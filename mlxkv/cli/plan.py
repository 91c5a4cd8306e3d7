"""mlxkv plan: which KV-cache configuration fits a context in a memory budget, before loading anything."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxkv.cli.common import HelpFormatter, count_arg, size_arg
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog
from mlxkv.errors import UserError
from mlxkv.loading.models import MODEL_HELP
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE
from mlxkv.units import SIZE_HELP

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
BASELINES = ("mlxlm-fp16", "mlxlm-q8", "mlxlm-q4")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict KV-cache memory per configuration and what fits a budget",
        description=(
            "Predict, for each KV-cache configuration, the bytes per token, the cache at the target "
            "context, the total with the weights, the run's peak (weights, cache, a prefill step's "
            "activations, the load's own peak) and the longest context whose peak fits the memory "
            "budget; recommend the highest-quality configuration that fits. Reads only the model's "
            "config (and weight sizes): nothing is loaded."
        ),
        epilog=(
            "Examples:\n"
            "  mlxkv plan --context 8192\n"
            "  mlxkv plan --model meta-llama/Meta-Llama-3-8B --context 32k --memory 16GB\n"
            "  mlxkv plan --config config.json --context 100000 --max-kv 8192 --json plan.json\n\n"
            "Sizes are in MB and GB of 1024^2 and 1024^3 bytes. A config.json's quantization block is read as "
            "mlx-lm's loader reads it (bits, group size, per-module overrides).\n\n" + kv_epilog()
        ),
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP + " (a repo id: only config.json and safetensors headers are "
                     "downloaded; a .gguf file: its header only)")
    src.add_argument("--config", metavar="FILE", help="a model's config.json instead of --model")
    p.add_argument("--context", type=_tokens_arg, metavar="TOKENS",
                   help="target context (prompt + generated tokens), e.g. 32768 or 32k; "
                        "default: the model's trained context")
    p.add_argument("--memory", metavar="SIZE", type=size_arg,
                   help=f"memory budget, e.g. 8GB ({SIZE_HELP}; a bare 8 is refused rather than read as "
                        "8 bytes); default: this machine's recommended working set (or $MLXKV_MEMORY)")
    p.add_argument("--batch", type=count_arg("--batch"), default=1, metavar="N", help="sequences generated together (default 1)")
    p.add_argument("--ranks", type=count_arg("--ranks"), default=1, metavar="N",
                   help="plan one of N machines the model is split over with mlx.launch (default 1): each holds "
                        "1/N of the KV heads and of the transformer blocks' weights, and the whole embeddings "
                        "and output head; --memory is then one machine's")
    p.add_argument("--pipeline", action="store_true",
                   help="with --ranks: each machine runs whole layers (pipeline parallel) instead of 1/N of "
                        "every layer's heads (tensor parallel)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="float16",
                   help="dtype the model computes in: float16 on a Mac (default); float32 for a CPU device, "
                        "where mlxkv also expands quantized weights to float32")
    p.add_argument("--prefill-step-size", type=count_arg("--prefill-step-size"), default=DEFAULT_PREFILL_STEP_SIZE,
                   metavar="TOKENS", help=f"prompt tokens per prefill step, as in mlxkv generate (default "
                   f"{DEFAULT_PREFILL_STEP_SIZE}): a step's activations are part of the predicted peak")
    p.add_argument("--weights-bytes", metavar="SIZE", type=size_arg, help=f"the weights' size, when you know better (e.g. 4.5GB; {SIZE_HELP})")
    p.add_argument("--configs", "--kv-configs", dest="configs", metavar="SPEC,SPEC,...",
                   help="configurations to compare, names or spec strings (default: every scheme, best measured "
                        "quality first)")
    p.add_argument("--baselines", action="store_true", help=f"also show mlx-lm's caches ({', '.join(BASELINES)})")
    add_kv_arguments(p, multi=True)
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the plan as JSON to FILE (or to stdout without FILE) instead of the table")
    p.set_defaults(run=run)


def _tokens_arg(text: str) -> int:
    from mlxkv.units import parse_tokens

    try:
        return parse_tokens(text, "context")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from mlxkv.device import is_cpu
    from mlxkv.memory.machine_memory import device_memory
    from mlxkv.loading.model_config import model_source, weights_bytes
    from mlxkv.memory.layout import block_parameter_share, layout_from_config, split_modes
    from mlxkv.memory.peak import load_transient_estimate
    from mlxkv.memory.planner import candidate_configs, compatible_configs, plan, recommend, weights_per_rank
    from mlxkv.report import check_output_path
    from mlxkv.units import format_bytes

    if args.json not in (None, "-"):
        check_output_path(args.json, "--json")
    memory = device_memory(args.memory)  # parse the budget before any download
    explicit_weights = args.weights_bytes
    from mlxkv.cli.kv_args import overrides_from_args, specs_from_args

    if args.kv_bits == "auto":
        raise UserError("mlxkv plan recommends a configuration itself; drop --kv-bits auto")
    if args.configs:  # the flags apply to each named config; each must work
        configs = candidate_configs(specs_from_args(args, args.configs))
        invalid: dict[str, str] = {}
    else:  # every scheme with the flags applied; those the flags rule out are noted
        overrides = overrides_from_args(args)
        if args.kv_bits is not None:
            overrides["bits"] = args.kv_bits
        configs, invalid = candidate_configs(None, skip_invalid=True, **overrides)
    for name in BASELINES if args.baselines else ():
        try:
            configs.update(candidate_configs([name], **{k: v for k, v in overrides_from_args(args).items()
                                                        if k in ("group_size", "max_kv", "sinks")}))
        except UserError:
            pass  # mlx-lm's quantized cache cannot hold a window: no such baseline

    source = model_source(args.model, args.config)
    layout = layout_from_config(source.config).per_rank(args.ranks, args.pipeline)  # one machine's part
    modes = split_modes(source.config) if args.ranks > 1 else None
    mode = "pipeline" if args.pipeline else "tensor"
    if modes is not None and mode not in modes:
        raise UserError(f"mlx-lm cannot split {layout.model_type or 'this'} models {mode}-parallel; "
                        + (f"{'drop' if args.pipeline else 'pass'} --pipeline" if modes else "plan one machine"))
    configs, skipped = compatible_configs(configs, layout)
    if not configs or (args.configs and skipped):  # a configuration the user named must work
        raise UserError(next(iter(skipped.values())))
    dtype_bytes = DTYPE_BYTES[args.dtype]
    load = 0
    if explicit_weights is not None:
        weights, weights_how = explicit_weights, "given with --weights-bytes"
    else:
        weights, weights_how = weights_bytes(source, dtype_bytes)
        load = load_transient_estimate(source.stored_bytes, weights) if dtype_bytes == 4 else 0
    if layout.ranks > 1:
        whole, share = weights, block_parameter_share(source.config)
        weights = weights_per_rank(whole, layout, share)
        load = 0  # mlxkv.distributed resets the peak after sharding
        weights_how = (f"one rank's part of {format_bytes(whole)} ({weights_how}); "
                       + ("the embeddings and output head on every rank" if share is not None
                          else "mlx-lm cannot build this model, so every weight is taken as split"))
    context = args.context or layout.max_position_embeddings
    if context is None:
        raise UserError("the model config does not say its context length; pass --context TOKENS")

    rows = plan(layout, context, memory.recommended, weights, configs, dtype_bytes, args.batch,
                args.prefill_step_size, load)
    choice = recommend(rows, memory.recommended, context)
    notes = _notes(layout, rows, context, args.dtype, is_cpu())
    notes += [f"skipped {name}: {why}" for name, why in {**invalid, **skipped}.items()]

    if args.json is not None:
        _write_json(args.json, rows, choice, {
            "model": source.name, "model_kind": source.kind, "model_type": layout.model_type,
            "layout": layout.describe(), "layout_source": layout.source, "context": context,
            "batch": args.batch, "prefill_step_size": args.prefill_step_size, "load_bytes": load, "ranks": args.ranks, "pipeline": args.pipeline, "dtype": args.dtype,
            "budget_bytes": memory.recommended,
            "budget_source": memory.source, "weights_how": weights_how, "notes": notes,
        })
        return 0

    from mlxkv.report import text_table

    shown = Path(source.name).name if source.kind in ("gguf", "directory", "config") else source.name
    print(f"model:   {shown} ({layout.model_type or 'unknown type'}; {layout.describe()})")
    print(f"weights: {format_bytes(weights)} ({weights_how})"
          + (f"; loading peaks {format_bytes(load)} above them (quantized weights expanded)" if load else ""))
    print(f"budget:  {format_bytes(memory.recommended)} ({memory.source})")
    print(f"target:  {context:,} tokens, batch {args.batch}, {args.dtype} model dtype, "
          f"prefill steps of {args.prefill_step_size:,}"
          + (f"; per machine, one of {args.ranks}" if args.ranks > 1 else "") + "\n")
    table = [{
        "config": r.config,
        "bits": r.bits_per_element,
        "per_token": f"{r.kv_bytes_per_token:,}",
        "kv": format_bytes(r.kv_bytes),
        "total": format_bytes(r.total_bytes),
        "peak": format_bytes(r.peak_bytes),
        "max": "unbounded" if r.max_context is None else f"{r.max_context:,}",
        "fits": r.fits,
    } for r in rows]
    print(text_table(table, ["config", "bits", "per_token", "kv", "total", "peak", "max", "fits"],
                     ["config", "bits/elem", "bytes/token", f"KV @ {context:,}", "KV + weights",
                      "peak", "max context", "fits"]))
    print()
    if choice is None:
        from mlxkv.memory.planner import no_fit_message

        print(f"nothing fits: {no_fit_message(rows, memory.recommended, context)}")
    else:
        print(f"recommended: {choice[1]}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _notes(layout: Any, rows: Sequence[Any], context: int, dtype: str, cpu: bool) -> list[str]:
    notes = ["KV bytes include the growth slack (caches grow 256 tokens at a time); the peak adds the "
             "largest prefill step's attention and activations, or the load's own peak, and is what must "
             "fit (see MEMORY.md)"]
    trained = layout.max_position_embeddings
    if trained and context > trained:
        notes.append(f"the target context ({context:,}) exceeds the model's trained context ({trained:,})")
    n_window = sum(layer.window is not None for layer in layout.attention_layers)
    if n_window:
        notes.append(f"bytes/token is what each new token adds at long context: the {n_window} sliding-window "
                     "layers stop growing at their window (bits/elem counts every layer)")
    if any(r.kv_bytes_per_token == 0 for r in rows):
        notes.append("a window (max_kv, H2O) stops growing once full: bytes/token 0, max context unbounded")
    if len(layout.attention_layers) < len(layout.layers):
        notes.append("layers without a KV cache (recurrent or convolution state) keep a constant state, not counted")
    if cpu and dtype != "float32":
        notes.append("MLX runs on the CPU here, where mlxkv computes in float32 (dense caches and weights "
                     "take twice the bytes): pass --dtype float32 to plan for this machine")
    return notes


def _write_json(target: str, rows: list, choice: tuple[str, str] | None, info: dict[str, Any]) -> None:
    from mlxkv.report import run_metadata, write_json

    metadata = run_metadata(**info, recommended=None if choice is None else
                            {"config": choice[0], "reason": choice[1]})
    records = [r.as_dict() for r in rows]
    if target == "-":
        json.dump({"metadata": metadata, "rows": records}, sys.stdout, indent=2)
        print()
    else:
        write_json(target, records, metadata, "--json")
