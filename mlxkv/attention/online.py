"""Attention over packed segments in key blocks, with an online softmax (flash attention's
recurrence, written in MLX ops).

Scores of a whole chunk against a whole context (heads x chunk x context floats, and the
softmax's copies) would make a prefill's memory grow with the context. Here each segment
is cut into blocks of keys; a block's scores are computed from the packed data as stored
(``store.matmul_block``: a quantized block is unpacked, one block at a time, and multiplied
by BLAS, faster than ``mx.quantized_matmul`` for this many rows), folded into a running
maximum ``m``, sum ``l`` and output ``acc`` per query row, and dropped:

    m' = max(m, rowmax(s)),  p = exp(s - m'),  a = exp(m - m')
    l' = a l + rowsum(p),    acc' = a acc + p @ V,        out = acc / l

Learned sink logits (gpt-oss) start the recurrence: ``m = sink``, ``l = 1``, ``acc = 0``,
which puts ``exp(sink)`` in the denominator and nothing in the output. A row whose block is
all masked (scores at the dtype's minimum) is corrected away by ``a = 0`` as soon as a
visible key arrives, as one softmax over every segment would.

H2O's observer needs each key's final weight ``exp(s - m) / l`` summed per batch row over heads
and queries, which depends on the final ``m`` and ``l``. With an observer the blocks are
visited twice: the first pass finds ``m`` and ``l`` (scores only), the second computes
each block's scores again, normalizes them, hands their column sums to the observer and
multiplies them with the values. Without an observer one pass does it all. (Views whose
scores fit one block, decode steps among them, never come here: ``mlxkv.attention.sdpa``
attends them in one shot.)
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mlxkv.attention.blocks import key_block_size
from mlxkv.attention.view import Mask, Segment

Observer = Callable[[list[mx.array]], None]


def segment_unit(seg: Segment) -> int:
    """Blocks of a segment start at multiples of this: whole groups along tokens (per-channel keys)."""
    return max(seg.key_store.token_unit, seg.value_store.token_unit)


def _slots(store, parts: tuple, start: int, end: int, length: int) -> tuple:
    """Slots ``start .. end`` of a segment's packed parts (the parts themselves when whole).

    The segment's own parts, not ``store.read_range``: a segment may be a snapshot taken
    before the store was overwritten (a sink window's ring during a long chunk)."""
    if start == 0 and end == length:
        return parts
    return tuple(p[store._index(i, start, end)] for i, p in enumerate(parts))


def per_row(mask: mx.array) -> mx.array:
    """A mask array as scores [B, KV heads, n_rep, L, T] take it: [L, T] is every row's; a
    batch of sequences gives each row its own, [B, L, T]."""
    return mask[:, None, None] if mask.ndim == 3 else mask


def _block_mask(mask: Mask, n_queries: int, length: int, start: int, end: int) -> mx.array | None:
    """The segment's mask restricted to keys ``start .. end`` (None: all visible)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        first_query = length - n_queries  # causal: the last n_queries keys are the queries
        if end - 1 <= first_query:  # every query sees the whole block
            return None
        return mx.arange(start, end)[None, :] <= mx.arange(first_query, length)[:, None]
    return per_row(mask[..., start:end])


def _spans(segments: list[Segment], block: int) -> list[tuple[int, int, int]]:
    """(segment index, first key, end key) of every key block, in order; a segment's blocks
    are whole multiples of its unit, except its last."""
    spans = []
    for index, seg in enumerate(segments):
        unit = segment_unit(seg)
        size = max(unit, block // unit * unit)
        spans += [(index, start, min(start + size, seg.length)) for start in range(0, seg.length, size)]
    return spans


def _scores(q: mx.array, seg: Segment, start: int, end: int, n_rep: int) -> mx.array:
    """Scores of keys ``start .. end`` of ``seg``, [B, KV heads, n_rep*L, keys] float32,
    masked keys at float32's minimum."""
    B, n_kv_heads, rows, _ = q.shape
    L = rows // n_rep
    keys = _slots(seg.key_store, seg.keys, start, end, seg.length)
    s = seg.key_store.matmul_block(q, keys, transpose=True).astype(mx.float32)
    mask = _block_mask(seg.mask, L, seg.length, start, end)
    if mask is None:
        return s
    s = s.reshape(B, n_kv_heads, n_rep, L, end - start)
    return mx.where(mask, s, mx.finfo(mx.float32).min).reshape(B, n_kv_heads, rows, end - start)


def _after(q: mx.array, previous: list[mx.array]) -> mx.array:
    """``q``, made to wait for the previous block's results (``mx.depends``).

    A block's scores need only ``q`` and its keys, so MLX's breadth-first scheduler is free
    to compute many blocks' scores before the recurrence consumes them; chained, it cannot.
    Either way MLX's encoder allocates outputs some ~100 operations ahead of the kernels
    that fill them (on the CPU: 10 tasks of 10 dispatches), so a few blocks are alive at
    once; measured on the CPU (16 to 32 blocks of 18,432 x 256 scores): about 13 blocks'
    worth with the chain, 20 without."""
    return mx.depends(q, previous) if previous else q


def _times_values(p: mx.array, seg: Segment, start: int, end: int, dtype: mx.Dtype) -> mx.array:
    values = _slots(seg.value_store, seg.values, start, end, seg.length)
    return seg.value_store.matmul_block(p.astype(dtype), values, transpose=False).astype(mx.float32)


def online_attention(
    q: mx.array,
    segments: list[Segment],
    n_rep: int,
    sink_logits: mx.array | None = None,
    observer: Observer | None = None,
    block: int | None = None,
) -> mx.array:
    """Softmax attention of ``q`` [B, KV heads, n_rep*L, D] (scaled, query heads folded onto
    their KV head) over ``segments``, in blocks of ``block`` keys (default: ``key_block_size``
    for these query rows). Returns [B, KV heads, n_rep*L, Dv] in ``q``'s dtype."""
    B, n_kv_heads, rows, _ = q.shape
    if block is None:
        block = key_block_size(B * n_kv_heads * rows)
    m = l = None
    if sink_logits is not None:  # one more logit per row, in the denominator only
        L = rows // n_rep
        m = sink_logits.astype(mx.float32).reshape(1, n_kv_heads, n_rep, 1, 1)
        m = mx.broadcast_to(m, (B, n_kv_heads, n_rep, L, 1)).reshape(B, n_kv_heads, rows, 1)
        l = mx.ones_like(m)
    if observer is None:
        acc = None
        for index, start, end in _spans(segments, block):
            s = _scores(_after(q, [acc, l] if acc is not None else []), segments[index], start, end, n_rep)
            m_new = s.max(axis=-1, keepdims=True) if m is None else mx.maximum(m, s.max(axis=-1, keepdims=True))
            p = mx.exp(s - m_new)
            pv = _times_values(p, segments[index], start, end, q.dtype)
            if m is None:
                l, acc = p.sum(axis=-1, keepdims=True), pv
            else:
                alpha = mx.exp(m - m_new)
                l = l * alpha + p.sum(axis=-1, keepdims=True)
                acc = pv if acc is None else acc * alpha + pv
            m = m_new
        return (acc / l).astype(q.dtype)

    # First pass: the final maximum and sum of every row, from the scores alone.
    spans = _spans(segments, block)
    for index, start, end in spans:
        s = _scores(_after(q, [l] if l is not None else []), segments[index], start, end, n_rep)
        m_new = s.max(axis=-1, keepdims=True) if m is None else mx.maximum(m, s.max(axis=-1, keepdims=True))
        total = mx.exp(s - m_new).sum(axis=-1, keepdims=True)
        l = total if l is None else l * mx.exp(m - m_new) + total
        m = m_new
    # Second pass: the final weights, block by block, to the observer and onto the values.
    inv_l = 1.0 / l
    acc = column = None
    sums: list[list[mx.array]] = [[] for _ in segments]
    for index, start, end in spans:
        s = _scores(_after(q, [m, inv_l] if acc is None else [acc, column]), segments[index], start, end, n_rep)
        p = mx.exp(s - m) * inv_l
        column = p.sum(axis=(1, 2))  # [B, keys]: each row's own attention
        sums[index].append(column)
        pv = _times_values(p, segments[index], start, end, q.dtype)
        acc = pv if acc is None else acc + pv
    observer([mx.concatenate(parts, axis=1) if parts else mx.zeros((B, 0), mx.float32) for parts in sums])
    return acc.astype(q.dtype)
