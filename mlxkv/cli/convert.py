"""``mlxkv convert``: import a GGUF file into an mlx-lm model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlxkv.loading.gguf_import import PACKED_TENSOR_TYPES, SUPPORTED_ARCHITECTURES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="import a GGUF file into an mlx-lm model directory",
        description=(
            "Import a GGUF file into a directory that mlx_lm.load (and mlxkv generate) reads: "
            "config.json, model.safetensors and a Hugging Face tokenizer with the file's chat template. "
            f"Architectures: {', '.join(SUPPORTED_ARCHITECTURES)}. Tensor types: every type the gguf "
            f"package decodes; {', '.join(PACKED_TENSOR_TYPES)} stay packed (MLX's affine layout, "
            "bit for bit), the others (K-quants, i-quants) become float16."
        ),
        epilog="mlxkv generate also accepts a .gguf file or a short model name directly and caches the import.",
    )
    parser.add_argument("--gguf", required=True, type=Path, metavar="FILE", help="the GGUF file to import")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory; created if missing, must be empty unless --force")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty DIR, replacing only the files the import writes")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from mlxkv.loading.gguf_import import import_gguf
    from mlxkv.report import check_output_dir

    check_output_dir(args.out.expanduser(), "--out")  # before the import reads the whole file
    out_dir = import_gguf(args.gguf, args.out, overwrite=args.force)
    print(f"wrote {out_dir}")
    return 0
