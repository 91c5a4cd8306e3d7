"""The one attention function for mlxkv caches: softmax(q k^T) v over packed segments.

Scores and outputs are computed on each segment as stored (``mx.quantized_matmul`` on
packed data), never on a dequantized copy of the cache; one softmax spans all segments,
computed in key blocks with an online softmax (``mlxkv.attention.online``) so that a
prompt chunk's scores never exist all at once. How many keys a block holds is the rule in
``mlxkv.attention.blocks``.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mlxkv.attention.blocks import fits_one_block
from mlxkv.attention.online import online_attention
from mlxkv.attention.view import KVView, Segment
from mlxkv.caches.storage import DenseStore


def attend(
    queries: mx.array,
    view: KVView,
    scale: float,
    sinks: mx.array | None = None,
) -> mx.array:
    """Attention of ``queries`` [B, Hq, L, D] over the view's segments (GQA included).

    ``sinks``: mlx-lm's name for learned per-head logits that join the softmax denominator
    (gpt-oss); called ``sink_logits`` below, "sinks" being the attention-sink tokens.
    """
    if view.rotated:  # H is orthonormal and symmetric: (Hq)·(Hk) = q·k, and H(Σ p Hv) = Σ p v
        out = _attend(mx.hadamard_transform(queries), view.segments, scale, sinks, view.observer)
        return mx.hadamard_transform(out)
    return _attend(queries, view.segments, scale, sinks, view.observer)


def _fused(segments: list[Segment], observer, score_rows: int) -> bool:
    """Whether MLX's fused kernel can take the whole view: one exact segment, no observer
    (the kernel does not expose its weights), and either a GPU, where the kernel works in
    tiles, or scores small enough to exist at once (on a CPU the kernel is composed of ops
    that hold every score)."""
    if observer is not None or len(segments) != 1:
        return False
    only = segments[0]
    if type(only.key_store) is not DenseStore or type(only.value_store) is not DenseStore:
        return False
    return mx.default_device().type == mx.DeviceType.gpu or fits_one_block(score_rows, only.length)


def _attend(
    queries: mx.array, segments: list[Segment], scale: float, sink_logits: mx.array | None,
    observer: Callable[[list[mx.array]], None] | None = None,
) -> mx.array:
    B, n_q_heads, L, D = queries.shape
    if _fused(segments, observer, B * n_q_heads * L):
        only = segments[0]
        return mx.fast.scaled_dot_product_attention(
            queries, only.keys[0], only.values[0], scale=scale, mask=only.mask, sinks=sink_logits
        )
    n_kv_heads = segments[0].keys[0].shape[1]
    n_rep = n_q_heads // n_kv_heads
    # GQA: the query heads sharing a KV head become rows of one matrix, so each packed KV
    # head is read once per step rather than once per query head.
    q = (queries * scale).reshape(B, n_kv_heads, n_rep * L, D)
    out = online_attention(q, segments, n_rep, sink_logits, observer)
    return out.reshape(B, n_q_heads, L, -1).astype(queries.dtype)
