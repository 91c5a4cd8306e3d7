"""The one attention function for mlxkv caches: softmax(q k^T) v over packed segments.

Scores and outputs are computed on each segment as stored (``mx.quantized_matmul`` on
packed data, or one unpacked key block at a time in the blockwise path), never on a
dequantized copy of the cache; one softmax spans all segments.
When every score fits one block (``mlxkv.attention.blocks``: a decode step, a short chunk)
they are computed at once and normalized by one softmax; past that, in key blocks with an
online softmax (``mlxkv.attention.online``), so that a prompt chunk's scores never exist
all at once. Decode keeps the one-shot path because it is the faster of the two there:
the same step through the online recurrence measured 0.95-1.02x on 4K-token caches, and
H2O's observer would need the scores twice.
"""

from __future__ import annotations

import itertools

import mlx.core as mx

from mlxkv.attention.blocks import fits_one_block
from mlxkv.attention.online import Observer, online_attention, per_row
from mlxkv.attention.view import KVView, Mask, Segment
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


def _fused(segments: list[Segment], observer: Observer | None, score_rows: int) -> bool:
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
    observer: Observer | None = None,
) -> mx.array:
    B, n_q_heads, L, D = queries.shape
    if _fused(segments, observer, B * n_q_heads * L):
        only = segments[0]
        mask = only.mask[:, None] if isinstance(only.mask, mx.array) and only.mask.ndim == 3 else only.mask
        return mx.fast.scaled_dot_product_attention(
            queries, only.keys[0], only.values[0], scale=scale, mask=mask, sinks=sink_logits
        )
    n_kv_heads = segments[0].keys[0].shape[1]
    n_rep = n_q_heads // n_kv_heads
    # GQA: the query heads sharing a KV head become rows of one matrix, so each packed KV
    # head is read once per step rather than once per query head.
    q = (queries * scale).reshape(B, n_kv_heads, n_rep * L, D)
    if fits_one_block(B * n_q_heads * L, sum(seg.length for seg in segments)):
        out = _one_shot(q, segments, n_rep, sink_logits, observer)
    else:
        out = online_attention(q, segments, n_rep, sink_logits, observer)
    return out.reshape(B, n_q_heads, L, -1).astype(queries.dtype)


def _as_bool_mask(mask: Mask, q_len: int, k_len: int) -> mx.array | None:
    """A mask that broadcasts over scores [B, KV heads, n_rep, L, T]."""
    if isinstance(mask, mx.array):
        return per_row(mask)
    if mask is None:
        return mask
    if mask == "causal":
        return mx.arange(k_len)[None, :] <= mx.arange(k_len - q_len, k_len)[:, None]
    raise ValueError(f"unknown mask {mask!r}")


def _one_shot(
    q: mx.array, segments: list[Segment], n_rep: int, sink_logits: mx.array | None, observer: Observer | None,
) -> mx.array:
    """Every score at once, one softmax: ``q`` [B, KV heads, n_rep*L, D], scaled."""
    B, n_kv_heads, rows, _ = q.shape
    L = rows // n_rep
    scores = []
    for seg in segments:
        s = seg.key_store.matmul(q, seg.keys, transpose=True).reshape(B, n_kv_heads, n_rep, L, -1)
        mask = _as_bool_mask(seg.mask, L, seg.length)
        if mask is not None:
            s = mx.where(mask, s, mx.finfo(s.dtype).min)
        scores.append(s)
    scores = mx.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]

    if sink_logits is not None:
        column = sink_logits.astype(scores.dtype).reshape(1, n_kv_heads, n_rep, 1, 1)
        column = mx.broadcast_to(column, scores.shape[:-1] + (1,))
        weights = mx.softmax(mx.concatenate([column, scores], axis=-1), axis=-1, precise=True)[..., 1:]
    else:
        weights = mx.softmax(scores, axis=-1, precise=True)
    weights = weights.reshape(B, n_kv_heads, rows, -1)
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
    return out
