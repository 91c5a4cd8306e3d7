"""Texts to evaluate on: the user's file, or a real English text bundled with mlxkv.

The bundled text is Lewis Carroll's "Alice's Adventures in Wonderland" (public domain),
Project Gutenberg's Millennium Fulcrum Edition 2.9 as ``alice29.txt`` of the Canterbury
compression corpus, taken from the Brotli 1.2.1 source distribution on PyPI
(``tests/testdata/alice29.txt``, sha256 7467306e...38f0). Changed only in layout: CRLF
line ends to LF, each paragraph's wrapped lines joined (no space after a line-final
hyphen), runs of spaces collapsed. About 37,000 SmolLM2 tokens; 35,804 Gemma 3 tokens, enough
for 32K-token contexts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mlxkv.errors import UserError

BUNDLED_TEXT = "alice_in_wonderland.txt"
BUNDLED_NAME = "Alice's Adventures in Wonderland (Lewis Carroll, public domain; bundled with mlxkv)"


@dataclass(frozen=True)
class Corpus:
    """A text and a label that says where it came from (printed and saved with results)."""

    text: str
    name: str


def bundled_corpus() -> Corpus:
    """The real English prose shipped with mlxkv: needs no download."""
    text = resources.files("mlxkv.eval").joinpath("data").joinpath(BUNDLED_TEXT).read_text(encoding="utf-8")
    return Corpus(text, BUNDLED_NAME)


def load_corpus(path: str | os.PathLike | None = None) -> Corpus:
    """The text in ``path`` (UTF-8), or the bundled one when ``path`` is None."""
    if path is None:
        return bundled_corpus()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"no such text file: {path}; pass an existing UTF-8 file or omit --text") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) or omit --text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"{path} is empty; pass a file with some text")
    return Corpus(text, os.path.basename(os.fspath(path)))


def corpus_tokens(tokenizer: Any, corpus: Corpus, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the corpus, as the tokenizer encodes it (BOS
    included when the tokenizer adds one)."""
    if n_tokens < 2:
        raise UserError(f"--tokens must be at least 2 (one prediction needs two tokens), got {n_tokens}")
    ids = list(tokenizer.encode(corpus.text))
    if len(ids) < n_tokens:
        raise UserError(
            f"{corpus.name} has only {len(ids)} tokens, fewer than --tokens {n_tokens}; "
            "lower --tokens or pass a longer --text"
        )
    return ids[:n_tokens]
