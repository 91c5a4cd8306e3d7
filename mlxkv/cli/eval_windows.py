"""``mlxkv eval kld --contexts 8k,32k``: KLD at long context, scored in windows before each length.

The whole-text ``eval kld`` keeps the reference's log-probabilities for every position, which a
long context with a large vocabulary cannot afford; this path runs every cache in lockstep
and scores only the last ``--window`` predictions before each length (``mlxkv.eval.windows``).
"""

from __future__ import annotations

import argparse
import os


from mlxkv.cli.common import count_arg, token_list_arg

WINDOW_COLUMNS = (
    ("context", "context"),
    ("config", "config"),
    ("kld", "KLD"),
    ("kld_p99", "KLD p99"),
    ("ppl", "ppl"),
    ("ppl_change_pct", "ppl +%"),
    ("top1", "top-1"),
    ("bits_per_element", "bits/elt"),
    ("description", "cache"),
)


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    from mlxkv.eval.windows import DEFAULT_WINDOW
    from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

    p.add_argument("--contexts", type=token_list_arg, default=None, metavar="N,N,...",
                   help="long-context mode: score only the last --window predictions before each length "
                        "(e.g. 8k,32k, all in one pass), every cache run in lockstep so no [tokens, vocab] "
                        "log-probabilities are kept; replaces --tokens")
    p.add_argument("--window", type=count_arg("--window"), default=DEFAULT_WINDOW, metavar="W",
                   help=f"with --contexts: predictions scored before each length, fed --chunk at a time "
                        f"(default {DEFAULT_WINDOW})")
    p.add_argument("--prefill-chunk", type=count_arg("--prefill-chunk"), default=DEFAULT_PREFILL_STEP_SIZE,
                   metavar="C", help="with --contexts: tokens per forward pass between the scored windows, "
                                     f"no logits computed (default {DEFAULT_PREFILL_STEP_SIZE}, as a prompt's prefill)")


def run_kld_windows(args: argparse.Namespace) -> int:
    from mlxkv.cli.eval import _advance_tokens, _prepare, write_kld_outputs
    from mlxkv.eval.corpus import corpus_tokens, load_corpus
    from mlxkv.eval.windows import evaluate_windows, schedule, tokens_per_run
    from mlxkv.report import progress, run_metadata

    schedule(args.contexts, args.window)  # a bad --window / --contexts fails before loading
    corpus = load_corpus(args.text)
    specs, reference, model, tokenizer, model_name = _prepare(args)
    tokens = corpus_tokens(tokenizer, corpus, max(args.contexts))

    total = (len(specs) + 1) * tokens_per_run(args.contexts)
    with progress(total=total, desc="eval kld", unit="tok") as bar:
        rows = evaluate_windows(model, tokens, specs, args.contexts, args.window, args.chunk, args.prefill_chunk,
                                reference, _advance_tokens(bar))

    metadata = run_metadata(
        model=model_name, corpus=corpus.name, contexts=sorted(args.contexts), window=args.window, chunk=args.chunk,
        prefill_chunk=args.prefill_chunk, reference=reference.label, configs=[s.label for s in specs],
    )
    ref_ppl = ", ".join(f"{r['ppl_ref']:.4g} at {r['context']}" for r in rows if r["config"] == rows[0]["config"])
    about = [
        f"model: {model_name}",
        f"text: {corpus.name}; at each length N, the predictions of tokens N-{args.window}..N-1 scored, fed in "
        f"chunks of {args.chunk} after a prefill in chunks of {args.prefill_chunk}",
        f"reference: {reference.label} ({reference.description}), perplexity {ref_ppl}",
    ]

    def plot(path: str) -> None:
        from mlxkv.eval.plot import plot_kld_context

        plot_kld_context(rows, path, title=f"{os.path.basename(model_name)}: the last {args.window} predictions "
                         f"before each length\n{corpus.name.split(' (')[0]}, chunks of {args.chunk}")

    return write_kld_outputs(args, rows, metadata, "mlxkv eval kld --contexts", about, WINDOW_COLUMNS, plot)
