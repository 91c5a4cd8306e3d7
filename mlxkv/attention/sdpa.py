"""The one attention function for mlxkv caches: softmax(q k^T) v over packed segments.

Scores and outputs are computed on each segment as stored (``mx.quantized_matmul`` on
packed data), never on a dequantized copy of the cache; one softmax spans all segments.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import mlx.core as mx

from mlxkv.attention.view import KVView, Mask
from mlxkv.caches.storage import DenseStore


def _as_bool_mask(mask: Mask, q_len: int, k_len: int) -> mx.array | None:
    """A mask that broadcasts over scores [B, kv_heads, rep, L, T]: [L, T] for every row, or
    [B, L, T] (a batch of sequences, each with its own visible keys)."""
    if isinstance(mask, mx.array) and mask.ndim == 3:
        return mask[:, None, None]
    if mask is None or isinstance(mask, mx.array):
        return mask
    if mask == "causal":
        return mx.arange(k_len)[None, :] <= mx.arange(k_len - q_len, k_len)[:, None]
    raise ValueError(f"unknown mask {mask!r}")


def attend(
    queries: mx.array,
    view: KVView,
    scale: float,
    sinks: mx.array | None = None,
) -> mx.array:
    """Attention of ``queries`` [B, Hq, L, D] over the view's segments (GQA included).

    ``sinks``: learned per-head logits that join the softmax denominator (gpt-oss).
    """
    if view.rotated:  # H is orthonormal and symmetric: (Hq)·(Hk) = q·k, and H(Σ p Hv) = Σ p v
        out = _attend(mx.hadamard_transform(queries), view.segments, scale, sinks, view.observer)
        return mx.hadamard_transform(out)
    return _attend(queries, view.segments, scale, sinks, view.observer)


def _attend(
    queries: mx.array, segments: list, scale: float, sinks: mx.array | None,
    observer: Callable[[list[mx.array]], None] | None = None,
) -> mx.array:
    only = segments[0]
    if (
        observer is None  # the fused kernel does not expose its weights
        and len(segments) == 1
        and type(only.key_store) is DenseStore
        and type(only.value_store) is DenseStore
    ):
        mask = only.mask[:, None] if isinstance(only.mask, mx.array) and only.mask.ndim == 3 else only.mask
        return mx.fast.scaled_dot_product_attention(
            queries, only.keys[0], only.values[0], scale=scale, mask=mask, sinks=sinks
        )

    B, n_q_heads, L, D = queries.shape
    n_kv_heads = only.keys[0].shape[1]
    n_rep = n_q_heads // n_kv_heads
    # GQA: the query heads sharing a KV head become rows of one matrix, so each packed KV
    # head is read once per step rather than once per query head.
    q = (queries * scale).reshape(B, n_kv_heads, n_rep * L, D)

    scores = []
    for seg in segments:
        s = seg.key_store.matmul(q, seg.keys, transpose=True).reshape(B, n_kv_heads, n_rep, L, -1)
        mask = _as_bool_mask(seg.mask, L, seg.length)
        if mask is not None:
            s = mx.where(mask, s, mx.finfo(s.dtype).min)
        scores.append(s)
    scores = mx.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]

    if sinks is not None:
        sink_logits = sinks.astype(scores.dtype).reshape(1, n_kv_heads, n_rep, 1, 1)
        sink_logits = mx.broadcast_to(sink_logits, scores.shape[:-1] + (1,))
        weights = mx.softmax(mx.concatenate([sink_logits, scores], axis=-1), axis=-1, precise=True)
        weights = weights[..., 1:]
    else:
        weights = mx.softmax(scores, axis=-1, precise=True)
    weights = weights.reshape(B, n_kv_heads, n_rep * L, -1)
    if observer is not None:
        totals = weights.astype(mx.float32).sum(axis=(1, 2))  # [B, T]: each row's own attention
        ends = list(itertools.accumulate(seg.length for seg in segments))
        observer([totals[:, end - seg.length : end] for seg, end in zip(segments, ends)])

    out = None
    start = 0
    for seg in segments:
        w = weights[..., start : start + seg.length]
        start += seg.length
        part = seg.value_store.matmul(w, seg.values, transpose=False)
        out = part if out is None else out + part
    return out.reshape(B, n_q_heads, L, -1).astype(queries.dtype)
