"""One prefill key block's two products on a quantized store: ``matmul`` (``mx.quantized_matmul``
on the packed data) against ``matmul_block`` (the block unpacked, then a plain matmul), with
float32 attention over the same keys as the yardstick.

One layer of the default model's attention (9 query heads over 3 KV heads of 64), a chunk
of 2,048 queries over ``--context`` keys stored as ``q4-kivi-rot`` stores them (keys per
channel, values per token, 4-bit, groups of 64), in blocks of ``--block`` keys with the
online softmax's exp; medians over interleaved rounds. Why ``online_attention`` uses
``matmul_block``:

    python scripts/attention_block_bench.py --context 8192 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
import mlx.core as mx

from mlxkv.caches.storage import ChannelQuantizedStore, QuantizedStore

QUERIES, Q_HEADS, KV_HEADS, HEAD_DIM = 2048, 9, 3, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192, help="keys attended (default 8192)")
    parser.add_argument("--block", type=int, default=64, help="keys per block (default 64: one group)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    rep = Q_HEADS // KV_HEADS
    q = mx.random.normal((1, KV_HEADS, rep * QUERIES, HEAD_DIM)) * HEAD_DIM**-0.5
    k = mx.random.normal((1, KV_HEADS, args.context, HEAD_DIM))
    v = mx.random.normal((1, KV_HEADS, args.context, HEAD_DIM))
    keys, values = ChannelQuantizedStore(args.bits, 64), QuantizedStore(args.bits, 64)
    keys.write(0, k)
    values.write(0, v)
    mx.eval(q, k, v, keys.parts, values.parts)

    def blocks(product: str) -> mx.array:
        out = None
        for start in range(0, args.context, args.block):
            end = min(start + args.block, args.context)
            s = getattr(keys, product)(q, keys.read_range(start, end), transpose=True)
            p = mx.exp(s - s.max(axis=-1, keepdims=True))
            pv = getattr(values, product)(p, values.read_range(start, end), transpose=False)
            out = pv if out is None else out + pv
        return out

    def dense() -> mx.array:
        return mx.softmax(q @ k.swapaxes(-1, -2), axis=-1) @ v

    runs = {"quantized_matmul (matmul)": lambda: blocks("matmul"),
            "unpacked block (matmul_block)": lambda: blocks("matmul_block"),
            "float32 keys, one shot": dense}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            mx.eval(run())
            seconds[name].append(time.perf_counter() - start)
    yardstick = statistics.median(seconds["float32 keys, one shot"])
    print(f"{QUERIES} queries x {args.context} keys, {args.bits}-bit, blocks of {args.block}, "
          f"{args.rounds} rounds (medians)")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:32s} {median:7.2f} s  {yardstick / median:5.2f}x float32's speed")


if __name__ == "__main__":
    main()
