"""How each GGUF tensor is stored for mlx-lm: kept packed where MLX has the same layout, else float16.

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: every block of 32 weights is ``d * q + m`` with one scale,
  one offset and 4, 5 or 8-bit integers, which is exactly MLX's affine quantization with
  groups of 32. These stay packed, bit for bit (``mx.load`` does the same for the first three,
  but refuses a whole file as soon as one tensor is a K-quant). ``gguf`` dequantizes the
  blocks; the integers are read back from those values and the block scales, then packed
  the way ``mx.quantize`` packs them.
- Every other type ``gguf`` decodes (K-quants, i-quants, BF16, ...) becomes float16:
  K-quants nest 6- or 8-bit sub-scales in 256-weight super-blocks, and Q2_K/Q3_K/Q6_K use
  groups of 16, which MLX has no layout for. float16 keeps each dequantized weight to within
  2^-11 of its value, far below the quantization step, and loads in every mlx-lm on every
  device (on a CPU mlxkv expands to float32 anyway). The cost is memory: 2 bytes per weight
  instead of ~0.6 (Gemma 3 270M: 0.55 GB instead of 0.25 GB).
- F32 and F16 tensors keep their dtype; BF16 stays bfloat16.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import mlx.core as mx
import numpy as np

from mlxkv.loading.gguf_file import GGUFTensor

GROUP_SIZE = 32  # every block type kept packed holds 32 weights per scale
PACK_ROWS = 8192

# ggml type -> (bits, offset or None): weight = d * (q - offset) with q unsigned, or d * q + m when
# offset is None. (Q8_0 stores q - 128 as a signed byte: the same thing.)
AFFINE_BLOCKS: dict[str, tuple[int, int | None]] = {
    "Q4_0": (4, 8), "Q4_1": (4, None), "Q5_0": (5, 16), "Q5_1": (5, None), "Q8_0": (8, 128),
}


def stored_dtype(tensor: GGUFTensor) -> str:
    """What one tensor becomes: "packed" (MLX affine), or a float dtype name."""
    if tensor.type_name in AFFINE_BLOCKS and len(tensor.shape) == 2 and tensor.shape[-1] % GROUP_SIZE == 0:
        return "packed"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(tensor.type_name, "float16")


def convert_tensor(tensor: GGUFTensor, values: np.ndarray | None = None) -> dict[str, mx.array]:
    """``{"weight": ...}`` or ``{"weight", "scales", "biases"}`` for one tensor. ``values`` are
    the tensor's floats after a convention was undone; they are then stored as floats."""
    kind = stored_dtype(tensor)
    if values is None and kind == "packed":
        return _pack_affine(tensor)
    if values is None:
        values = tensor.to_float32()
    dtype = {"packed": mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16}.get(kind, mx.float16)
    if dtype == mx.float16 and not np.isfinite(values.astype(np.float16)).all():
        dtype = mx.float32  # a weight beyond float16's range: keep float32 rather than store inf
    return {"weight": mx.array(values).astype(dtype)}


def _pack_affine(tensor: GGUFTensor) -> dict[str, mx.array]:
    bits, offset = AFFINE_BLOCKS[tensor.type_name]
    rows, cols = tensor.shape
    blocks = np.asarray(tensor.raw).reshape(rows, cols // GROUP_SIZE, -1)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # each block starts with d (float16)
    if offset is None:
        bias = blocks[..., 2:4].copy().view(np.float16)[..., 0]  # then m
    else:
        bias = (scale.astype(np.float32) * -offset).astype(np.float16)  # exact: offset is a power of two
    if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        return {"weight": mx.array(tensor.to_float32())}  # a block scale beyond float16: keep float32
    packed = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    for start in range(0, rows, PACK_ROWS):  # in slices: the bit stream takes a byte per bit
        stop = min(start + PACK_ROWS, rows)
        values = tensor.rows_float32(start, stop).reshape(stop - start, -1, GROUP_SIZE)
        d = scale[start:stop].astype(np.float32)[..., None]
        q = np.rint((values - bias[start:stop].astype(np.float32)[..., None]) / np.where(d == 0, 1, d))
        packed[start:stop] = _pack_bits(np.clip(q, 0, 2**bits - 1).astype(np.uint8).reshape(stop - start, cols), bits)
    return {"weight": mx.array(packed), "scales": mx.array(scale), "biases": mx.array(bias)}


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row a little-endian bit stream, ``bits`` per value, read as uint32."""
    stream = np.unpackbits(q[..., None], axis=-1, count=bits, bitorder="little").reshape(q.shape[0], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def quantization_config(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the most common bit width as the default, with a
    per-module entry (keyed by module path, as ``mlx_lm.utils.load_model`` reads it) for
    each module packed differently, and ``False`` for 2-D float modules."""
    bits: dict[str, int | None] = {}
    for name, array in weights.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and array.ndim == 2:
            scales = weights.get(f"{module}.scales")
            bits[module] = None if scales is None else array.shape[-1] // scales.shape[-1]
    counts = Counter(b for b in bits.values() if b is not None)
    if not counts:
        return None
    default_bits = counts.most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default_bits}
    for module, module_bits in sorted(bits.items()):
        if module_bits is None:
            config[module] = False
        elif module_bits != default_bits:
            config[module] = {"group_size": GROUP_SIZE, "bits": module_bits}
    return config
