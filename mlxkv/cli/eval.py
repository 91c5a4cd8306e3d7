"""mlxkv eval: what a KV config costs in quality, against the full-precision cache.

``mlxkv eval kld``: KL divergence, perplexity and top-1 agreement on a text.
``mlxkv eval passkey``: retrieval of a pass key hidden in filler text.
``mlxkv eval layers``: each layer's sensitivity to quantization, and a ``--kv-bits-map`` that
spends a bit budget on the sensitive layers (checked on held-out text).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mlxkv.cli.common import HelpFormatter, count_arg, token_list_arg
from mlxkv.cli.kv_args import add_kv_arguments, kv_epilog, specs_from_args
from mlxkv.errors import UserError
from mlxkv.loading import load_info
from mlxkv.loading.models import MODEL_HELP

KLD_CONFIGS = "fp16,q8,k8v4,q4,q4-nores,q2,mlxlm-q8,mlxlm-q4"
PASSKEY_CONFIGS = "q8,k8v4,q4"

KLD_COLUMNS = (
    ("config", "config"),
    ("kld", "KLD"),
    ("kld_p99", "KLD p99"),
    ("ppl", "ppl"),
    ("ppl_change_pct", "ppl +%"),
    ("top1", "top-1"),
    ("bits_per_element", "bits/elt"),
    ("description", "cache"),
)

KLD_NOTES = """\
KLD: mean KL(P_ref || P_config) per position over the full vocabulary, float32, in nats
(p99: its 99th percentile). ppl: perplexity of the text's next tokens; "ppl +%": change
against the reference's. top-1: positions where both caches' most likely tokens agree.
bits/elt: the cache's filled bytes at the end (packed data, scales, biases, the 16-bit
residual tier) per key/value element held; full-precision caches hold float32 on a CPU."""

PASSKEY_NOTES = """\
Accuracy: share of trials whose answer's first number is the pass key (greedy decoding).
The reference row is the full-precision cache on the same prompts: small models miss keys
even at full precision, so compare each config with it, not with 1."""


# -- argument parsing -------------------------------------------------------------------
def _depths_arg(text: str) -> list[float]:
    """argparse type for --depths: fractions 0 (start) to 1 (end), e.g. 0,0.5,1."""
    try:
        depths = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}; write fractions such as 0,0.5,1") from None
    outside = [d for d in depths if not 0 <= d <= 1]
    if outside or not depths:
        problem = f"depth {outside[0]:g} is outside 0..1" if outside else "no depth given"
        raise argparse.ArgumentTypeError(f"{problem}; use fractions such as 0,0.5,1")
    return depths


def _common(p: argparse.ArgumentParser, default_configs: str) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    add_kv_arguments(p, multi=True)
    p.add_argument("--configs", default=default_configs, metavar="SPEC,SPEC,...",
                   help="KV configs (listed below), each with optional overrides such as q4:residual=64 "
                        f"(default {default_configs})")
    p.add_argument("--reference", default=None, metavar="SPEC",
                   help="the full-precision cache every config is compared with (default mlxlm-fp16: "
                        "mlx-lm's own KVCache, independent of mlxkv's code)")
    p.add_argument("--json", metavar="FILE", help="write the rows, the command and the machine to FILE")
    p.add_argument("--markdown", metavar="FILE", help="write the table as markdown to FILE")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="quality of KV configs against full precision (KL divergence, perplexity, pass key)",
        description="Measure what a quantized KV cache costs in quality, against the full-precision "
                    "cache on the same model and text.",
        epilog="Run 'mlxkv eval kld --help', 'mlxkv eval passkey --help' or 'mlxkv eval layers --help'.",
    )
    tests = p.add_subparsers(dest="eval_command", metavar="TEST", required=True)

    k = tests.add_parser(
        "kld", help="KL divergence, perplexity and top-1 agreement on a text",
        description="Run a text through the model once with the reference cache and once per config, "
                    "in small chunks so that the stored (quantized) history shapes attention as in "
                    "generation, and compare the next-token distributions position by position.",
        epilog="Example:\n  mlxkv eval kld --tokens 1024 --chunk 16 --configs fp16,q8,q4,mlxlm-q4 "
               "--json kld.json --plot kld.png" + "\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    from mlxkv.eval.kld import DEFAULT_CHUNK as KLD_CHUNK
    from mlxkv.eval.kld import DEFAULT_TOKENS

    _common(k, KLD_CONFIGS)
    k.add_argument("--text", metavar="FILE", help="a UTF-8 text file (default: Alice's Adventures in "
                   "Wonderland, public domain, bundled with mlxkv)")
    k.add_argument("--tokens", type=count_arg("--tokens", 2), default=DEFAULT_TOKENS, metavar="N",
                   help=f"tokens of the text to run (the first N; default {DEFAULT_TOKENS})")
    k.add_argument("--chunk", type=count_arg("--chunk"), default=KLD_CHUNK, metavar="C",
                   help=f"tokens per forward pass (default {KLD_CHUNK}). A chunk attends to itself exactly in mlxkv's "
                        "caches, which hides part of the loss of configs without a residual window; 1 is "
                        "exactly what generation sees (slower)")
    k.add_argument("--plot", metavar="FILE.png", help="plot KLD against bits per element to FILE (needs matplotlib; "
                   "with --contexts, KLD against context length)")
    from mlxkv.cli.eval_windows import add_window_arguments

    add_window_arguments(k)
    k.set_defaults(run=run_kld)

    pk = tests.add_parser(
        "passkey", help="retrieval of a pass key hidden in filler text",
        description="Hide a random five-digit pass key at each depth of filler text, ask for it at the "
                    "end and decode greedily; report the share of keys found per config, length and "
                    "depth, beside the full-precision cache's share on the same prompts.",
        epilog="Example:\n  mlxkv eval passkey --lengths 512,1024 --depths 0,0.5,1 --configs q8,q4"
               + "\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    from mlxkv.eval.passkey import DEFAULT_CHUNK, DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_TRIALS

    _common(pk, PASSKEY_CONFIGS)
    pk.add_argument("--lengths", type=token_list_arg, default=list(DEFAULT_LENGTHS),
                    metavar="N,N,...", help=f"prompt lengths in tokens (default {','.join(map(str, DEFAULT_LENGTHS))})")
    pk.add_argument("--depths", type=_depths_arg, default=list(DEFAULT_DEPTHS),
                    metavar="D,D,...", help="where the key sits in the filler, 0 (start) to 1 (end) "
                    f"(default {','.join(map(str, DEFAULT_DEPTHS))})")
    pk.add_argument("--trials", type=count_arg("--trials"), default=DEFAULT_TRIALS, metavar="N",
                    help=f"keys per length and depth (default {DEFAULT_TRIALS})")
    pk.add_argument("--chunk", type=count_arg("--chunk"), default=DEFAULT_CHUNK, metavar="C",
                    help=f"prompt tokens per forward pass (default {DEFAULT_CHUNK}; a chunk attends to itself "
                         "exactly in mlxkv's caches)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the pass keys (default 0)")
    pk.set_defaults(run=run_passkey)

    from mlxkv.eval.layers import DEFAULT_BASE, DEFAULT_CALIBRATION_TOKENS, DEFAULT_CHECK_TOKENS, DEFAULT_HIGH_BITS

    lp = tests.add_parser(
        "layers", help="per-layer sensitivity, and a --kv-bits-map for a bit budget (calibration)",
        description="Quantize one layer's cache at a time with --base (every other layer full "
                    "precision) and measure the KL divergence on a short text: the layers where it "
                    "costs most are the ones to keep at --high-bits. Raise the most sensitive layers "
                    "while the mean packed bits per element stays within --budget, print the "
                    "--kv-bits-map, then check it on the text that follows the calibration tokens "
                    "against --base alone and against raising the same number of first and last "
                    "layers (the usual guess).",
        epilog="Example:\n  mlxkv eval layers --base q3 --high-bits 8 --budget 4 --json layers.json --plot layers.png\n"
               "then:\n  mlxkv generate --kv-config q3 --kv-bits-map <the printed map> ...\n\n"
               "The budget counts packed bits per element: bits plus the 16-bit scale and bias per group "
               "(3-bit g64 = 3.5, 8-bit g64 = 8.5), not the residual window." + "\n\n" + kv_epilog(),
        formatter_class=HelpFormatter,
    )
    lp.add_argument("--model", help=MODEL_HELP)
    lp.add_argument("--base", default=DEFAULT_BASE, metavar="SPEC",
                    help=f"the config most layers keep, also the probe of each layer (default {DEFAULT_BASE})")
    lp.add_argument("--high-bits", type=int, default=DEFAULT_HIGH_BITS, metavar="BITS",
                    help=f"bits of the raised layers (default {DEFAULT_HIGH_BITS}; 16 = full precision)")
    lp.add_argument("--budget", type=float, default=None, metavar="BITS",
                    help="mean packed bits per element over the layers (default: the base's plus 0.5)")
    lp.add_argument("--text", metavar="FILE", help="a UTF-8 text file (default: the bundled Alice's Adventures "
                    "in Wonderland)")
    lp.add_argument("--tokens", type=count_arg("--tokens", 2), default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                    help=f"calibration tokens, the start of the text (default {DEFAULT_CALIBRATION_TOKENS})")
    lp.add_argument("--check-tokens", type=count_arg("--check-tokens", 0), default=DEFAULT_CHECK_TOKENS, metavar="N",
                    help=f"held-out tokens right after them for the check; 0 skips it (default {DEFAULT_CHECK_TOKENS})")
    lp.add_argument("--chunk", type=count_arg("--chunk"), default=KLD_CHUNK, metavar="C",
                    help=f"tokens per forward pass (default {KLD_CHUNK})")
    lp.add_argument("--json", metavar="FILE",
                    help="write the per-layer rows, the map, the check and the machine to FILE")
    lp.add_argument("--markdown", metavar="FILE", help="write the tables as markdown to FILE")
    lp.add_argument("--plot", metavar="FILE.png", help="plot the per-layer KL divergence to FILE (needs matplotlib)")
    lp.set_defaults(run=run_layers)


# -- shared steps -------------------------------------------------------------------------
def _check_outputs(args: argparse.Namespace) -> None:
    """Every file the command will write (--json, --markdown, --plot), checked before loading."""
    from mlxkv.report import check_output_path, check_plot_path

    check_output_path(args.json, "--json")
    check_output_path(args.markdown, "--markdown")
    check_plot_path(getattr(args, "plot", None), "--plot")


def _model_name(model: Any, args: argparse.Namespace) -> str:
    return str(getattr(load_info(model), "source", None) or args.model or "default model")


def _prepare(args: argparse.Namespace):
    """Check specs and output paths before loading anything, then load the model."""
    import mlxkv
    from mlxkv.eval.configs import DEFAULT_REFERENCE, as_spec, parse_specs

    specs = parse_specs(specs_from_args(args, args.configs))
    reference = as_spec(args.reference or DEFAULT_REFERENCE)
    if reference.config is not None and reference.config.quantized:
        raise UserError(f"--reference {reference.label} is quantized; use a full-precision cache such as mlxlm-fp16 or fp16")
    _check_outputs(args)
    model, tokenizer = mlxkv.load(args.model)
    for spec in (reference, *specs):
        spec.make(model)  # a config the model cannot hold (group size vs head_dim) fails now, not mid-run
    return specs, reference, model, tokenizer, _model_name(model, args)


def _advance(bar) -> Callable[[str], None]:
    def advance(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    return advance


def _advance_tokens(bar) -> Callable[[str, int], None]:
    def advance(label: str, n: int) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(n)

    return advance


def _render(title: str, about: Sequence[str], table: str, notes: str, metadata: dict[str, Any],
            markdown: bool) -> str:
    m = metadata["machine"]
    about = [*about, f"machine: {m['machine']} {m['chip']}, {m['os']}, {m['device']}, BLAS {m['blas']}, "
                     f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, mlxkv {m['mlxkv']}"]
    if not markdown:
        return "\n".join([*about, "", table, "", notes])
    return "\n".join([
        f"# {title}", "", f"Command: `{metadata['command']}`  ", f"Date: {metadata['date']}  ",
        *(f"{line}  " for line in about), "", table, "", notes, "",
    ])


def _write_outputs(args: argparse.Namespace, rows, metadata, render: Callable[[bool], str],
                   plot: Callable[[str], None] | None = None) -> None:
    """Print the table; write --json, --markdown and (with ``plot``) --plot; name the files."""
    from mlxkv.report import write_json, write_text

    print(render(False))
    if args.json:
        write_json(args.json, rows, metadata)
    if args.markdown:
        write_text(args.markdown, render(True), "--markdown")
    plot_path = getattr(args, "plot", None)
    if plot is not None and plot_path:
        plot(plot_path)
    for path in (args.json, args.markdown, plot_path if plot is not None else None):
        if path:
            print(f"[mlxkv] wrote {path}", file=sys.stderr)


# -- kld ------------------------------------------------------------------------------------
def run_kld(args: argparse.Namespace) -> int:
    if args.contexts:
        from mlxkv.cli.eval_windows import run_kld_windows

        return run_kld_windows(args)
    from mlxkv.eval.corpus import corpus_tokens, load_corpus
    from mlxkv.eval.kld import chunks_per_run, evaluate_kld
    from mlxkv.report import progress, run_metadata

    corpus = load_corpus(args.text)
    specs, reference, model, tokenizer, model_name = _prepare(args)
    tokens = corpus_tokens(tokenizer, corpus, args.tokens)

    total = (len(specs) + 1) * chunks_per_run(len(tokens), args.chunk)
    with progress(total=total, desc="eval kld", unit="chunk") as bar:
        rows = evaluate_kld(model, tokens, specs, args.chunk, reference, _advance(bar))

    metadata = run_metadata(
        model=model_name, corpus=corpus.name, tokens=len(tokens), chunk=args.chunk,
        reference=reference.label, configs=[s.label for s in specs],
    )
    about = [
        f"model: {model_name}",
        f"text: {corpus.name}, first {len(tokens)} tokens, fed in chunks of {args.chunk}",
        f"reference: {reference.label} ({reference.description}), perplexity {rows[0]['ppl_ref']:.4g}",
    ]

    def plot(path: str) -> None:
        from mlxkv.eval.plot import plot_kld

        plot_kld(rows, path, title=f"{os.path.basename(model_name)}, chunks of {args.chunk}\n"
                 f"{len(tokens)} tokens of {corpus.name.split(' (')[0]}")

    return write_kld_outputs(args, rows, metadata, "mlxkv eval kld", about, KLD_COLUMNS, plot)


def write_kld_outputs(args: argparse.Namespace, rows: Sequence[dict[str, Any]], metadata: dict[str, Any], title: str,
                      about: Sequence[str], columns: Sequence[tuple[str, str]], plot: Callable[[str], None]) -> int:
    """Print a KLD table (perplexity change in %) and write the files asked for: both modes of eval kld."""
    from mlxkv.report import markdown_table, text_table

    shown = [{**r, "ppl_change_pct": round(100 * r["ppl_change"], 2)} for r in rows]

    def render(markdown: bool) -> str:
        keys, headers = zip(*columns)
        table = (markdown_table if markdown else text_table)(shown, keys, headers)
        return _render(title, about, table, KLD_NOTES, metadata, markdown)

    _write_outputs(args, rows, metadata, render, plot)
    return 0


# -- passkey --------------------------------------------------------------------------------
def passkey_table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """One line per length for the reference and each config, one column per depth, and the
    mean over depths: (rows, columns, headers)."""
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    columns = ["config", "length", *(f"d{d:g}" for d in depths), "mean"]
    headers = ["config", "length", *(f"depth {d:g}" for d in depths), "mean"]
    table: list[dict[str, Any]] = []
    for length in dict.fromkeys(r["length"] for r in rows):
        at_length = [r for r in rows if r["length"] == length]
        first_config = at_length[0]["config"]
        reference = {f"d{r['depth']:g}": r["accuracy_ref"] for r in at_length if r["config"] == first_config}
        labelled = [(f"{at_length[0]['reference']} (reference)", reference)]
        for config in dict.fromkeys(r["config"] for r in at_length):
            labelled.append((config, {f"d{r['depth']:g}": r["accuracy"] for r in at_length if r["config"] == config}))
        for label, cells in labelled:
            table.append({"config": label, "length": length, **cells,
                          "mean": sum(cells.values()) / len(cells)})
    return table, columns, headers


def run_passkey(args: argparse.Namespace) -> int:
    from mlxkv.eval.passkey import answers_count, evaluate_passkey
    from mlxkv.report import markdown_table, progress, run_metadata, text_table

    specs, reference, model, tokenizer, model_name = _prepare(args)

    total = answers_count(len(specs), len(args.lengths), len(args.depths), args.trials)
    with progress(total=total, desc="eval passkey", unit="prompt") as bar:
        rows = evaluate_passkey(model, tokenizer, specs, args.lengths, args.depths, args.trials,
                                args.chunk, reference, args.seed, _advance(bar))

    metadata = run_metadata(
        model=model_name, lengths=args.lengths, depths=args.depths, trials=args.trials,
        chunk=args.chunk, seed=args.seed, reference=reference.label, configs=[s.label for s in specs],
    )
    table_rows, columns, headers = passkey_table_rows(rows)
    about = [
        f"model: {model_name}",
        f"pass-key prompts: {args.trials} key(s) (seed {args.seed}) per length and depth, prefilled in "
        f"chunks of {args.chunk}, greedy answers",
        f"reference: {reference.label} ({reference.description})",
    ]

    def render(markdown: bool) -> str:
        table = (markdown_table if markdown else text_table)(table_rows, columns, headers, digits=3)
        return _render("mlxkv eval passkey", about, table, PASSKEY_NOTES, metadata, markdown)

    _write_outputs(args, rows, metadata, render)
    return 0


# -- layers ---------------------------------------------------------------------------------
LAYERS_NOTES = """\
KLD alone: mean KL divergence from the full-precision cache when only this layer's cache uses
the base config, every other layer full precision. bits: what the map gives the layer."""


def run_layers(args: argparse.Namespace) -> int:
    import mlxkv
    from mlxkv.eval.configs import as_spec
    from mlxkv.eval.corpus import corpus_tokens, load_corpus
    from mlxkv.eval.layers import calibrate_and_check, calibration_chunks, check_layers_request, layer_count
    from mlxkv.report import markdown_table, progress, run_metadata, text_table

    base = as_spec(args.base)
    budget = check_layers_request(base.config, args.high_bits, args.budget, base_name=f"--base {args.base}",
                                  high_bits_name="--high-bits")
    _check_outputs(args)
    corpus = load_corpus(args.text)
    model, tokenizer = mlxkv.load(args.model)
    base.make(model)  # a config the model cannot hold fails before the long run
    tokens = corpus_tokens(tokenizer, corpus, args.tokens + args.check_tokens)
    calibration, held_out = tokens[: args.tokens], tokens[args.tokens:]
    n_layers = layer_count(model)
    model_name = _model_name(model, args)

    with progress(total=calibration_chunks(n_layers, len(calibration), len(held_out), args.chunk),
                  desc="eval layers", unit="chunk") as bar:
        result = calibrate_and_check(model, calibration, held_out, base.config, args.high_bits, budget,
                                     args.chunk, base.label, _advance(bar))
    rows, check, bits_map = result.rows, result.check, result.bits_map

    metadata = run_metadata(
        model=model_name, corpus=corpus.name, tokens=len(calibration), check_tokens=len(held_out),
        chunk=args.chunk, base=base.label, high_bits=args.high_bits, budget=budget, kv_bits_map=bits_map,
        check=check,
    )
    about = [
        f"model: {model_name}",
        f"calibration: the first {len(calibration)} tokens of {corpus.name}, chunks of {args.chunk}; "
        f"probe {base.label} ({base.description})",
        f"budget: {budget:g} packed bits per element; {len(result.config.layer_bits)} of {n_layers} layers at "
        f"{args.high_bits} bits, mean {result.mean_bits:.3g}",
    ]
    advice = (f"--kv-bits-map {bits_map}   (with --kv-config {base.label}; e.g. mlxkv generate --kv-config "
              f"{base.label} --kv-bits-map {bits_map})" if bits_map else
              "the budget raises no layer: keep the base config, or raise --budget")

    def render(markdown: bool) -> str:
        table = (markdown_table if markdown else text_table)(
            rows, ("layer", "kld", "top1", "bits"), ("layer", "KLD alone", "top-1", "bits"))
        after = [LAYERS_NOTES, "", advice]
        if check:
            check_table = (markdown_table if markdown else text_table)(
                check, ("config", "kld", "kld_p99", "top1", "kv_bits_map"),
                ("config", "KLD", "KLD p99", "top-1", "--kv-bits-map"))
            after += ["", f"Check on the next {len(held_out)} tokens (held out):", "", check_table]
        return _render("mlxkv eval layers", about, table, "\n".join(after), metadata, markdown)

    def plot(path: str) -> None:
        from mlxkv.eval.plot import plot_layers

        plot_layers(rows, path, title=f"{os.path.basename(model_name)}: {base.label} on one layer at a time, "
                    f"{len(calibration)} tokens")

    _write_outputs(args, rows, metadata, render, plot)
    return 0
