"""How many keys attention scores at once: the one rule, and the memory it implies.

Attention over a cache computes scores in blocks of keys (``mlxkv.attention.online``). A
block holds ``score_rows x keys`` float32 scores, ``score_rows`` = batch x query heads x
queries, and the rule keeps one block's scores within ``SCORE_BLOCK_BYTES`` (8 MiB): a
prefill step of 2,048 tokens on the default model (9 query heads) takes 113 keys a block
(per-channel key stores round down to whole 64-token groups), a decode step's few score
rows take any context in one block, so decode runs as one shot as before.

Why 8 MiB, measured on this machine (MLX's CPU backend, 2 cores; one layer of SmolLM2's
attention, 2,048 queries over a 4,096-token ``q4-kivi-rot`` cache, 7 interleaved rounds):
the speed is flat across blocks of 64 to 1,024 keys (0.95-1.04x the one-shot scores) while
the peak grows with the block, about 35 MiB + 6.6 blocks' scores: 64 MiB at 64 keys,
91 at 128, 154 at 256, 271 at 512, against 882 MiB for the one-shot scores. On a
full-precision cache blocks of 128 keys ran 0.96x the time of MLX's fused kernel (which
holds every score on a CPU), 256 to 4,096 keys 1.07-1.28x. On the whole prefill of 4,096
tokens in steps of 2,048 (``q4-kivi-rot``): transient 189 MiB at 8 MiB, 226 at 16 MiB,
712 MiB in one shot, at the same speed within the noise of a shared machine.

Several blocks are alive at once: MLX allocates each operation's output when it encodes
it, about 100 operations ahead of the kernels on the CPU (10 tasks of 10 dispatches), so
the peak is a few blocks' scores, not one; ``attention_transient_bytes`` carries the
measured multiples. On a GPU a full-precision view goes to MLX's fused kernel instead
(``mlxkv.attention.sdpa``), which works in tiles; packed views take these blocks there too,
and the budget was not measured on Metal.
"""

from __future__ import annotations

SCORE_BLOCK_BYTES = 8 * 2**20
"""Bytes of one block's scores."""

SCORE_ITEMSIZE = 4
"""Scores and the softmax's running state are float32 whatever the model's dtype."""

BLOCKS_IN_FLIGHT = 8
"""Block-sized arrays alive at a layer's attention peak (measured on the CPU: 6.6 for a
packed history with a 16-bit tail, 7.7 for one full-precision segment)."""

ROW_COPIES = 10
"""Query-row-sized arrays ([score_rows, head_dim] float32: scaled and rotated queries, the
running output, its rotation back) alive at that peak (measured: 7.7 to 10)."""


def key_block_size(score_rows: int) -> int:
    """Keys per block for ``score_rows`` rows of scores (batch x query heads x queries): as
    many as keep the block's scores within ``SCORE_BLOCK_BYTES``, at least one."""
    return max(1, SCORE_BLOCK_BYTES // (max(score_rows, 1) * SCORE_ITEMSIZE))


def fits_one_block(score_rows: int, keys: int) -> bool:
    """Whether all ``keys`` of ``score_rows`` rows fit one block: no need to go blockwise."""
    return keys <= key_block_size(score_rows)


def attention_transient_bytes(score_rows: int, keys: int, head_dim: int) -> int:
    """Predicted bytes one layer's attention holds above its inputs at its peak, for
    ``score_rows`` rows of scores (batch x query heads x queries) over ``keys`` keys: what a
    memory planner adds for a prefill step. A decode step's few rows make it negligible;
    the rest of a step's activations (projections, MLP) are not counted here."""
    block = min(keys, key_block_size(score_rows))
    return SCORE_ITEMSIZE * score_rows * (BLOCKS_IN_FLIGHT * block + ROW_COPIES * head_dim)
