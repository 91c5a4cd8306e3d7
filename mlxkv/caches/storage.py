"""Storage: how one tensor's tokens (keys or values, all heads) are encoded and grown.

A store is a row of token slots, ``[batch, heads, slots, dim]`` in some encoding. It knows
how to encode tokens, grow its buffers, and multiply a query (or attention weights) with
its packed contents. It does not know which token sits in which slot: that is the policy's
business (``mlxkv.caches.policy``), so every storage composes with every policy.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

Parts = tuple[mx.array, ...]


class TensorStore:
    """Slots of one tensor, grown in steps of ``step`` tokens up to ``max_slots``."""

    step = 256  # mlxkv.caches.book.STORE_STEP
    lossy = False

    def __init__(self, max_slots: int | None = None) -> None:
        self.max_slots = max_slots
        self.parts: Parts | None = None

    # -- encoding: the only part subclasses define ------------------------------
    def encode(self, x: mx.array) -> Parts:
        raise NotImplementedError

    def decode(self, parts: Parts) -> mx.array:
        """Back to float32, all of it: for conversions and reference checks, never for attention."""
        raise NotImplementedError

    def matmul(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        """``x @ stored.T`` (scores, transpose=True) or ``x @ stored`` (outputs), on the encoding."""
        raise NotImplementedError

    def matmul_block(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        """``matmul`` for a block of slots multiplied by many rows (a prefill's key block).

        Lossless stores: ``matmul`` itself. Quantized stores unpack the block to ``x``'s dtype
        first and multiply with a plain matmul: the copy is one block (64 tokens of one
        layer: 48 KiB on the default model, 1/170 of the block's scores), never the cache,
        and BLAS's matrix-matrix product beats ``mx.quantized_matmul``'s (on MLX's CPU
        backend, 2,048 queries over 8,192 4-bit keys: 2.8 s a layer against 7.3 s, float32
        scores 2.5 s; ``scripts/attention_block_bench.py``)."""
        return self.matmul(x, parts, transpose)

    def params(self) -> dict[str, Any]:
        """What it takes to rebuild an empty store of this kind (saved with prompt caches)."""
        return {"max_slots": self.max_slots}

    # -- buffers, shared by every encoding -----------------------------------------
    slot_axis = 2
    """The axis tokens run along in every part."""

    token_unit = 1
    """Tokens are written in whole multiples of this (a group along tokens, for per-channel stores)."""

    def _span(self, part: int, tokens: int) -> int:
        """Entries along ``slot_axis`` that ``tokens`` tokens take in part number ``part``."""
        return tokens

    def _index(self, part: int, start: int, end: int, rows: slice = slice(None)) -> tuple:
        index = [rows, slice(None), slice(None), slice(None)]
        index[self.slot_axis] = slice(self._span(part, start), self._span(part, end))
        return tuple(index)

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold room for."""
        return 0 if self.parts is None else self.parts[0].shape[self.slot_axis]

    def _reserve(self, slots: int, encoded: Parts) -> None:
        """Grow every part to hold ``slots`` tokens, by the book's rule (``grown_capacity``)."""
        from mlxkv.caches.book import grown_capacity

        if slots <= self.capacity:
            return
        grow = grown_capacity(self.capacity, slots, self.step, self.max_slots) - self.capacity

        def zeros(like: mx.array, part: int) -> mx.array:
            shape = list(like.shape)
            shape[self.slot_axis] = self._span(part, grow)
            return mx.zeros(shape, dtype=like.dtype)

        if self.parts is None:
            self.parts = tuple(zeros(e, i) for i, e in enumerate(encoded))
        else:
            self.parts = tuple(
                mx.concatenate([p, zeros(p, i)], axis=self.slot_axis) for i, p in enumerate(self.parts)
            )

    def write(self, slot: int, x: mx.array, rows: slice = slice(None)) -> None:
        """Encode ``x`` ([B, H, n, D]) into slots ``slot .. slot+n`` of the batch ``rows`` (all
        by default; in place when possible)."""
        end = slot + x.shape[2]
        if slot % self.token_unit or end % self.token_unit:
            raise ValueError(f"{type(self).__name__} writes whole groups of {self.token_unit} tokens")
        encoded = self.encode(x)
        self._reserve(end, encoded)
        for i, (part, enc) in enumerate(zip(self.parts, encoded)):
            part[self._index(i, slot, end, rows)] = enc

    def write_tokens(self, slots: mx.array, x: mx.array, where: mx.array) -> None:
        """One token per batch row: ``x[b]`` ([B, H, 1, D]) into slot ``slots[b]`` where ``where[b]``
        (the other rows keep what they hold). For stores written a token at a time, into
        existing capacity: a batch's decode step, without a Python loop over rows."""
        encoded = self.encode(x)
        keep = where[:, None, None, None]
        parts = []
        for part, enc in zip(self.parts, encoded):
            index = mx.broadcast_to(slots.astype(mx.int32)[:, None, None, None], enc.shape)
            old = mx.take_along_axis(part, index, axis=2)
            parts.append(mx.put_along_axis(part, index, mx.where(keep, enc, old), axis=2))
        self.parts = tuple(parts)

    def with_capacity(self, parts: Parts, capacity: int) -> Parts:
        """``parts`` grown with zeros (or cut) to ``capacity`` tokens along the slot axis."""
        resized = []
        for i, p in enumerate(parts):
            have, want = p.shape[self.slot_axis], self._span(i, capacity)
            if want < have:
                p = p[self._index(i, 0, capacity)]
            elif want > have:
                shape = list(p.shape)
                shape[self.slot_axis] = want - have
                p = mx.concatenate([p, mx.zeros(shape, dtype=p.dtype)], axis=self.slot_axis)
            resized.append(p)
        return tuple(resized)

    def read(self, n: int, snapshot: bool = False) -> Parts:
        """The first ``n`` slots, packed as stored. ``snapshot``: unaffected by later writes
        (a write updates the buffer arrays in place; a slice keeps the values it was taken of)."""
        if n == self.capacity and not snapshot:
            return self.parts
        return self.read_range(0, n)

    def read_range(self, start: int, end: int, rows: slice = slice(None)) -> Parts:
        """Slots ``start .. end``, packed as stored (whole groups for per-channel stores)."""
        return tuple(p[self._index(i, start, end, rows)] for i, p in enumerate(self.parts))

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not only the filled slots): what memory really holds."""
        return 0 if self.parts is None else sum(p.nbytes for p in self.parts)

    def slot_bytes(self, heads: int, dim: int, dtype_bytes: int) -> int:
        """Bytes one token slot takes for ``heads`` heads of ``dim`` elements: the one count the
        memory planner and ``nbytes`` share (``nbytes == capacity * slot_bytes``, by test)."""
        raise NotImplementedError

    def bits_per_element(self, head_dim: int) -> float:
        """Stored bits per element, scales and biases included."""
        if self.parts is None:
            raise ValueError("empty store")
        return 8 * sum(p.dtype.size * p.shape[-1] for p in self.parts) / head_dim


class DenseStore(TensorStore):
    """Plain arrays in the dtype the model computes in (lossless)."""

    def encode(self, x: mx.array) -> Parts:
        return (x,)

    def slot_bytes(self, heads: int, dim: int, dtype_bytes: int) -> int:
        return heads * dim * dtype_bytes

    def decode(self, parts: Parts) -> mx.array:
        return parts[0].astype(mx.float32)

    def matmul(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        y = parts[0]
        return x @ (y.swapaxes(-1, -2) if transpose else y)


class QuantizedStore(TensorStore):
    """Group-wise quantization with ``mx.quantize``.

    mode "affine": ``bits`` per element plus a 16-bit scale and bias per ``group_size``
    elements (4-bit g64 = 4.5 bits per element). Scales and biases stay 16-bit even when
    the model computes in float32 (on a CPU device), so a cache takes the same bytes
    everywhere; ``mx.quantized_matmul`` takes float32 inputs with float16 scales at the
    same speed. Microscaling modes ("mxfp4", "nvfp4", "mxfp8"): floating-point elements
    with one 8-bit scale per group and no bias.
    """

    lossy = True

    def __init__(self, bits: int, group_size: int, max_slots: int | None = None, mode: str = "affine") -> None:
        super().__init__(max_slots)
        self.bits = bits
        self.group_size = group_size
        self.mode = mode

    def params(self) -> dict[str, Any]:
        return {**super().params(), "bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def _format(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def slot_bytes(self, heads: int, dim: int, dtype_bytes: int) -> int:
        """Packed bits per element plus, per group, a 16-bit scale and bias (affine) or one
        8-bit scale (microscaling). Keys per channel: the same, per channel per group of tokens."""
        per_group = 2 * 2 if self.mode == "affine" else 1
        return heads * (dim * self.bits // 8 + per_group * dim // self.group_size)

    def encode(self, x: mx.array) -> Parts:
        if self.mode != "affine":
            return tuple(mx.quantize(x, **self._format()))
        w, scales, biases = mx.quantize(x, **self._format())
        scale_dtype = x.dtype if x.dtype in (mx.float16, mx.bfloat16) else mx.float16
        return w, scales.astype(scale_dtype), biases.astype(scale_dtype)

    def decode(self, parts: Parts) -> mx.array:
        if self.mode != "affine":
            return mx.dequantize(*parts, **self._format()).astype(mx.float32)
        w, scales, biases = parts
        return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), **self._format())

    def matmul(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        if self.mode != "affine":
            w, scales = parts
            return mx.quantized_matmul(x, w, scales, None, transpose=transpose, **self._format())
        return mx.quantized_matmul(x, *parts, transpose=transpose, **self._format())

    def matmul_block(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        w, scales, *biases = parts
        biases = biases[0].astype(x.dtype) if biases else None
        y = mx.dequantize(w, scales if self.mode != "affine" else scales.astype(x.dtype), biases,
                          dtype=x.dtype, **self._format())
        return x @ (y.swapaxes(-1, -2) if transpose else y)


class ChannelQuantizedStore(QuantizedStore):
    """Keys quantized per channel, in groups of ``group_size`` consecutive tokens (KIVI).

    Key outliers sit in a few channels; a scale per channel keeps them from crushing the
    rest of a token's group. Stored transposed, [B, H, D, tokens], so scores ``q @ K^T``
    are ``mx.quantized_matmul(q, K^T, transpose=False)``: on MLX's CPU backend that kernel
    is several times faster than the transposed one per-token keys need. Tokens arrive a
    whole group at a time; the cache's 16-bit residual tier holds the incomplete group.
    """

    slot_axis = 3

    @property
    def token_unit(self) -> int:  # type: ignore[override]
        return self.group_size

    def _span(self, part: int, tokens: int) -> int:
        if part == 0:
            return tokens * self.bits // 32
        return tokens // self.group_size

    @property
    def capacity(self) -> int:
        return 0 if self.parts is None else self.parts[1].shape[3] * self.group_size

    def encode(self, x: mx.array) -> Parts:
        return super().encode(x.swapaxes(-1, -2))

    def decode(self, parts: Parts) -> mx.array:
        return super().decode(parts).swapaxes(-1, -2)

    def matmul(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        # the stored matrix is K^T: x @ K^T needs no transpose of what is stored
        return super().matmul(x, parts, transpose=not transpose)

    def matmul_block(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        return super().matmul_block(x, parts, transpose=not transpose)


def make_store(
    bits: int | None, group_size: int, max_slots: int | None = None,
    per_channel: bool = False, mode: str = "affine",
) -> TensorStore:
    """The store for one tensor: dense when ``bits`` is None, else quantized (per token, or
    per channel over groups of tokens)."""
    if bits is None:
        return DenseStore(max_slots)
    kind = ChannelQuantizedStore if per_channel else QuantizedStore
    return kind(bits, group_size, max_slots, mode)


def store_from_params(kind: str, params: dict[str, Any]) -> TensorStore:
    """Rebuild an empty store from ``type(store).__name__`` and ``store.params()``."""
    kinds = {cls.__name__: cls for cls in (DenseStore, QuantizedStore, ChannelQuantizedStore)}
    if kind not in kinds:
        raise ValueError(f"unknown store kind {kind!r} in a saved cache")
    return kinds[kind](**params)


def convert_store(source: TensorStore, target: TensorStore) -> TensorStore:
    """Re-encode every slot of ``source`` into ``target`` (e.g. dense -> 4-bit), in one go."""
    if source.parts is not None:
        target.parts = target.encode(source.decode(source.parts))
    return target
