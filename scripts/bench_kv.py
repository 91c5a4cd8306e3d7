"""mlxkv bench at long contexts on a small random-weight model whose attention has the
default model's shape (SmolLM2-135M: 9 query heads over 3 KV heads of 64 dimensions) but
only a few layers and a narrow MLP, so the KV cache, not the weights, dominates time and
memory: what decoding at 16K-32K tokens looks like on this machine, in minutes.

    python scripts/bench_kv.py --contexts 4096,8192,16384,32768 --trials 3 \
        --json bench-long.json --markdown bench-long.md --plot bench-long.png

Same options and output as ``mlxkv bench`` (no --model), plus the model's size.
"""

from __future__ import annotations

import argparse
import sys

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.cli.bench import add_bench_arguments, bench_and_report, check_arguments
from mlxkv.errors import UserError
from mlxkv.loading.tiny import SMOLLM2_ATTENTION, tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4; SmolLM2-135M has 30)")
    parser.add_argument("--mlp", type=int, default=256, help="MLP width (default 256; SmolLM2-135M has 1536)")
    add_bench_arguments(parser, contexts=(4096, 8192, 16384, 32768))
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        if args.layers < 1 or args.mlp < 1:
            raise UserError("--layers and --mlp must be at least 1")
        model = tiny_model(
            "llama", num_hidden_layers=args.layers, intermediate_size=args.mlp,
            max_position_embeddings=max(args.contexts) + args.gen_tokens, **SMOLLM2_ATTENTION,
        )
        name = f"random llama, {args.layers} layers, SmolLM2-135M attention (9x3 heads x 64), MLP {args.mlp}"
        return bench_and_report(model, name, args)
    except UserError as e:
        print(f"bench_kv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
