"""The GGUF container read without its tensor data: metadata scalars, tensor names and ggml types.

``mx.load`` converts a GGUF in one go and does not say how each tensor was stored
(K-quants come back silently dequantized to float16, or not at all), so the importer
reads the header first: it can then refuse unsupported tensor types by name, and
report a truncated file before MLX is asked to read it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from math import prod
from pathlib import Path

import numpy as np

from mlxkv.errors import UserError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


class GGMLType(IntEnum):
    """How one tensor's data is stored (``ggml_type`` in ggml.h)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# ggml type -> (elements per block, bytes per block), to check that every tensor fits in the file.
GGML_BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
}

# ``general.file_type`` (llama_ftype in llama.h): the quantization a whole file was made with.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


def ggml_type_name(ggml_type: int) -> str:
    """``Q6_K`` for a known type id, ``type 99`` otherwise."""
    try:
        return GGMLType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; ``shape`` is in MLX (row-major) order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def nbytes(self) -> int | None:
        """Bytes of stored data, or None for a type this module does not know."""
        layout = GGML_BLOCK_LAYOUT.get(self.ggml_type)  # type: ignore[call-overload]
        if layout is None:
            return None
        elements_per_block, bytes_per_block = layout
        return prod(self.shape) // elements_per_block * bytes_per_block


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF says about itself. ``metadata`` holds scalars and strings only: arrays
    (the vocabulary, merges) are skipped here and read with the tensors by ``mx.load``."""

    path: Path
    version: int
    metadata: dict[str, int | float | bool | str]
    tensors: tuple[TensorInfo, ...]
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def file_type_name(self) -> str | None:
        """The whole file's quantization, e.g. ``Q4_K_M``, when the file says it."""
        file_type = self.metadata.get("general.file_type")
        if not isinstance(file_type, int):
            return None
        return FILE_TYPE_NAMES.get(file_type, f"file type {file_type}")


_SCALAR_FORMATS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


class _Cursor:
    """Sequential little-endian reads over the mapped file; running past the end raises
    ``struct.error``, which the caller reports as a truncated file."""

    def __init__(self, buffer: mmap.mmap | bytes) -> None:
        self.buffer = buffer
        self.position = 0

    def unpack(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from(fmt, self.buffer, self.position)
        self.position += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = int(self.unpack("<Q"))
        end = self.position + length
        if end > len(self.buffer):
            raise struct.error("string past the end of the file")
        raw = self.buffer[self.position : end]
        self.position = end
        return bytes(raw).decode("utf-8", errors="replace")  # only names and scalars are used

    def value(self, value_type: int) -> int | float | bool | str | None:
        """One metadata value; arrays are skipped and return None."""
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = int(self.unpack("<I")), int(self.unpack("<Q"))
            if item_type == _STRING:
                for _ in range(count):
                    length = int(self.unpack("<Q"))
                    self.position += length
            elif item_type in _SCALAR_FORMATS:
                self.position += count * struct.calcsize(_SCALAR_FORMATS[item_type])
            else:
                raise ValueError(f"unsupported metadata array element type {item_type}")
            if self.position > len(self.buffer):
                raise struct.error("array past the end of the file")
            return None
        if value_type == _FLOAT32:  # shortest decimal that is the same float32: 1e-05, not 9.99...e-06
            return float(str(np.float32(self.unpack("<f"))))
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        raise ValueError(f"unknown metadata value type {value_type}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header and check every tensor fits in the file.

    Raises UserError for a missing file, a file that is not GGUF, or a truncated one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such GGUF file: {path}")
    file_size = path.stat().st_size
    if file_size < 24:
        raise UserError(f"{path} is not a GGUF file (only {file_size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        if buffer[:4] != GGUF_MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        try:
            header = _parse(path, _Cursor(buffer), file_size)
        except struct.error:
            raise UserError(f"{path} is truncated or corrupt: its header ends early") from None
        except ValueError as e:
            raise UserError(f"{path} is corrupt: {e}") from None
    for tensor in header.tensors:
        nbytes = tensor.nbytes
        if nbytes is not None and header.data_start + tensor.offset + nbytes > file_size:
            raise UserError(
                f"{path} is truncated: tensor '{tensor.name}' extends past the end of the file "
                f"({file_size} bytes); download it again"
            )
    return header


def _parse(path: Path, cursor: _Cursor, file_size: int) -> GGUFHeader:
    cursor.position = 4
    version = int(cursor.unpack("<I"))
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (only versions 2 and 3)")
    tensor_count, metadata_count = int(cursor.unpack("<Q")), int(cursor.unpack("<Q"))
    metadata: dict[str, int | float | bool | str] = {}
    for _ in range(metadata_count):
        key = cursor.string()
        value = cursor.value(int(cursor.unpack("<I")))
        if value is not None:
            metadata[key] = value
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        ndim = int(cursor.unpack("<I"))
        ggml_dims = [int(cursor.unpack("<Q")) for _ in range(ndim)]
        ggml_type = int(cursor.unpack("<I"))
        offset = int(cursor.unpack("<Q"))
        tensors.append(TensorInfo(name, tuple(reversed(ggml_dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_start = -(-cursor.position // alignment) * alignment
    return GGUFHeader(path, version, metadata, tuple(tensors), data_start, file_size)
