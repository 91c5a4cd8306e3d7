"""``mlxkv convert``: import a GGUF file into an mlx-lm model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlxkv.loading.gguf import SUPPORTED_ARCHITECTURES, SUPPORTED_TENSOR_TYPES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    supported_types = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
    parser = subparsers.add_parser(
        "convert",
        help="import a GGUF file into an mlx-lm model directory",
        description=(
            "Import a GGUF file into a directory that mlx_lm.load (and mlxkv generate) reads: "
            "config.json, model.safetensors with the quantized weights kept packed, and a "
            "Hugging Face tokenizer with the file's chat template. "
            f"Supported: architecture {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"tensor types {supported_types}."
        ),
        epilog="mlxkv generate also accepts a .gguf file directly and caches the import.",
    )
    parser.add_argument("--gguf", required=True, type=Path, metavar="FILE", help="the GGUF file to import")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory; created if missing, must be empty unless --force")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty DIR, replacing only the files the import writes")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from mlxkv.loading.gguf import import_gguf

    out_dir = import_gguf(args.gguf, args.out, overwrite=args.force)
    print(f"wrote {out_dir}")
    return 0
