"""A GGUF file opened with the ``gguf`` package (maintained beside llama.cpp), with one-line errors.

``gguf.GGUFReader`` parses the container and ``gguf.quants.dequantize`` decodes every block
type it knows (K-quants and i-quants included). What this module adds is only what the
library leaves to its caller: a clear error for a missing, foreign, truncated or corrupt
file, metadata as plain Python values, tensor shapes in MLX (row-major) order, and the
raw block bytes for the types mlxkv keeps packed.

The reader maps the file and parses the whole header eagerly, vocabulary included: about
1 s for SmolLM2 (49K tokens) and 10 s for Gemma 3 (262K tokens) here. Importers pay it
once; the planner reads an imported model's config.json instead when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mlxkv.errors import UserError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the file stores it; ``shape`` is in MLX (row-major) order."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # ggml type, e.g. "Q6_K"
    raw: np.ndarray  # the stored bytes (or values, for F32/F16), mapped from the file

    @property
    def decodable(self) -> bool:
        """Whether ``gguf`` can turn this tensor into floats."""
        return decodable(self.type_name)

    def to_float32(self) -> np.ndarray:
        """The tensor's values as float32 in ``shape``, dequantized by ``gguf``."""
        return self.rows_float32(0, self.shape[0] if len(self.shape) > 1 else 1).reshape(self.shape)

    def rows_float32(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a 2-D tensor (or all of a 1-D one) as float32, shape (rows, columns)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.asarray(self.raw)
        raw = raw.reshape(self.shape[0], -1)[start:stop] if len(self.shape) > 1 else raw.reshape(1, -1)
        values = dequantize(raw, GGMLQuantizationType[self.type_name])
        return np.asarray(values, dtype=np.float32).reshape(len(raw), -1)


class GGUFFile:
    """Metadata and tensors of one GGUF file. Construction checks the whole header and that
    every tensor lies inside the file; tensor data is read only when asked for."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path).expanduser()
        _check_container(self.path)
        try:
            self._reader = GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            # The reader fails with a ValueError wherever the header or a tensor runs past the end.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{self.path} is truncated or corrupt ({reason}); download it again") from None
        size = self.path.stat().st_size
        for tensor in self._reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise UserError(f"{self.path} is truncated: tensor '{tensor.name}' extends past the end of the "
                                f"file ({size} bytes); download it again")

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key-value pair as Python values (arrays as lists), the ``GGUF.*`` header counts left out."""
        return {name: _plain(field.contents()) for name, field in self._reader.fields.items()
                if not name.startswith("GGUF.")}

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value without converting the others (the vocabulary is large)."""
        field = self._reader.fields.get(key)
        return default if field is None else _plain(field.contents())

    @cached_property
    def tensors(self) -> dict[str, GGUFTensor]:
        """GGUF tensor name -> tensor, in file order."""
        return {
            t.name: GGUFTensor(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name, t.data)
            for t in self._reader.tensors
        }

    @property
    def architecture(self) -> str:
        value = self.get("general.architecture")
        if not isinstance(value, str):
            raise UserError(f"{self.path.name} does not name its architecture (general.architecture)")
        return value

    @property
    def file_type_name(self) -> str | None:
        """The whole file's quantization, e.g. ``Q4_K_M``, when the file says it."""
        from gguf import LlamaFileType

        file_type = self.get("general.file_type")
        if not isinstance(file_type, int):
            return None
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file type {file_type}"

    @property
    def stored_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self._reader.tensors)

    @property
    def parameters(self) -> int:
        return sum(int(t.n_elements) for t in self._reader.tensors)


def _check_container(path: Path) -> None:
    """The reader's own messages for these cases are cryptic ('GGUF magic invalid', numpy errors)."""
    if not path.is_file():
        raise UserError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    if len(head) < 24:
        raise UserError(f"{path} is truncated: only {len(head)} bytes; download it again")


@cache
def decodable(type_name: str) -> bool:
    """Whether ``gguf`` dequantizes this ggml type: asked of the library with one zero block."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType[type_name]
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def is_gguf(path: Path) -> bool:
    """A ``.gguf`` name, or a file that starts with the GGUF magic."""
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _plain(value: Any) -> Any:
    """numpy scalars from the reader as Python ones; float32 metadata as its shortest decimal
    (1e-06, not 9.99999997e-07), which is what the model's config said before conversion."""
    if isinstance(value, list):
        return [_plain(v) for v in value] if value and isinstance(value[0], np.generic) else value
    if isinstance(value, np.floating):
        return float(str(np.float32(value)))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value
