"""A long real-text prompt for a long-context run: the bundled Alice text (or --text FILE) cut
at a paragraph end so that it and a question fit in --tokens of the model's tokenizer.

    python scripts/long_prompt.py --model gemma3-270m --tokens 30000 --out prompt30k.txt
    mlxkv generate --model gemma3-270m --kv-bits 4 --max-kv 32768 --prompt - < prompt30k.txt
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.cli.common import tokens_arg
from mlxkv.errors import UserError
from mlxkv.eval.corpus import load_corpus
from mlxkv.report import write_text

QUESTION = ("\n\nQuestion: In the story above, what is the name of the girl who follows the White Rabbit "
            "down the rabbit-hole, and who wrote the story?\nAnswer:")


def excerpt_prompt(tokenizer: Any, text: str, n_tokens: int, question: str = QUESTION) -> str:
    """The longest paragraph-aligned start of ``text`` that, with ``question`` after it, is at
    most ``n_tokens`` tokens (BOS included when the tokenizer adds one)."""
    ids = list(tokenizer.encode(text))
    room = n_tokens - len(tokenizer.encode(question))
    start = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else 0  # the BOS is not text
    head = tokenizer.decode(ids[start:max(room, start)])
    while head:
        head = head[:head.rfind("\n")] if "\n" in head else ""
        if len(tokenizer.encode(head + question)) <= n_tokens:
            return head + question
    raise UserError(f"--tokens {n_tokens} leaves no room for a paragraph before the question")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model whose tokenizer counts the tokens (default: the bundled SmolLM2-135M)")
    parser.add_argument("--tokens", type=tokens_arg, default=30000, help="prompt length in tokens (default 30000)")
    parser.add_argument("--text", help="a UTF-8 text file (default: the bundled Alice in Wonderland)")
    parser.add_argument("--out", help="write the prompt to this file (default: stdout)")
    args = parser.parse_args(argv)
    try:
        from mlx_lm.utils import load_tokenizer

        from mlxkv.loading.loader import resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(args.model)[1])
        prompt = excerpt_prompt(tokenizer, load_corpus(args.text).text, args.tokens)
        n = len(tokenizer.encode(prompt))
    except UserError as e:
        print(f"long_prompt: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, prompt, "--out")
    else:
        sys.stdout.write(prompt)
    print(f"long_prompt: {n} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
