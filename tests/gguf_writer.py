"""Write small GGUF files for tests, with any tensor type, and quantize like llama.cpp.

``mx.save_gguf`` writes only plain dtypes; the importer's error paths (K-quants, bad
architectures, truncation) and its Q4_0/Q4_1/Q8_0 handling need files whose tensors
are stored exactly as llama.cpp stores them, so this writes the container by hand.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import pre_tokenizers

from mlxkv.loading.gguf_file import GGML_BLOCK_LAYOUT, GGMLType

_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9


class Typed:
    """A metadata value with an explicit GGUF value type, e.g. Typed(_INT32, [1, 3])."""

    def __init__(self, value_type: int, value: Any) -> None:
        self.value_type, self.value = value_type, value


def int32_array(values: list[int]) -> Typed:
    return Typed(_INT32, list(values))


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(value_type: int, value: Any) -> bytes:
    fmt = {_UINT32: "<I", _INT32: "<i", _FLOAT32: "<f", _BOOL: "<?"}[value_type]
    return struct.pack(fmt, value)


def _value(value: Any) -> tuple[int, bytes]:
    if isinstance(value, Typed):
        if isinstance(value.value, list):
            body = b"".join(_scalar(value.value_type, v) for v in value.value)
            return _ARRAY, struct.pack("<IQ", value.value_type, len(value.value)) + body
        return value.value_type, _scalar(value.value_type, value.value)
    if isinstance(value, bool):
        return _BOOL, _scalar(_BOOL, value)
    if isinstance(value, int):
        return _UINT32, _scalar(_UINT32, value)
    if isinstance(value, float):
        return _FLOAT32, _scalar(_FLOAT32, value)
    if isinstance(value, str):
        return _STRING, _string(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _ARRAY, struct.pack("<IQ", _STRING, len(value)) + b"".join(_string(v) for v in value)
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return _value(Typed(_FLOAT32, value))
    raise TypeError(f"cannot write metadata value {value!r}")


def write_gguf(path: Path, metadata: dict[str, Any],
               tensors: dict[str, tuple[int, tuple[int, ...], bytes]], alignment: int = 32) -> Path:
    """``tensors``: name -> (ggml type, shape in row-major order, stored bytes)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        value_type, body = _value(value)
        out += _string(key) + struct.pack("<I", value_type) + body
    offset, blobs = 0, []
    for name, (ggml_type, shape, data) in tensors.items():
        offset = -(-offset // alignment) * alignment
        dims = list(reversed(shape))
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
        blobs.append((offset, data))
        offset += len(data)
    out += b"\0" * (-len(out) % alignment)
    data_start = len(out)
    for blob_offset, data in blobs:
        out += b"\0" * (data_start + blob_offset - len(out))
        out += data
    path.write_bytes(bytes(out))
    return path


# ---- llama.cpp block quantization (reference formulas from ggml-quants.c) ----

def _blocks(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(-1, 32)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Weights j and j+16 of a block share byte j (low, high nibble)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q8_0(x: np.ndarray) -> bytes:
    b = _blocks(x)
    d = np.abs(b).max(axis=1) / 127
    q = np.round(b / np.where(d == 0, 1, d)[:, None]).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1).tobytes()


def quantize_q4_0(x: np.ndarray) -> bytes:
    b = _blocks(x)
    signed_max = b[np.arange(len(b)), np.abs(b).argmax(axis=1)]
    d = signed_max / -8
    q = np.clip(np.round(b / np.where(d == 0, 1, d)[:, None]) + 8, 0, 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1).tobytes()


def quantize_q4_1(x: np.ndarray) -> bytes:
    b = _blocks(x)
    low, high = b.min(axis=1), b.max(axis=1)
    d = (high - low) / 15
    q = np.clip(np.round((b - low[:, None]) / np.where(d == 0, 1, d)[:, None]), 0, 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)], axis=1).tobytes()


QUANTIZERS = {GGMLType.Q8_0: quantize_q8_0, GGMLType.Q4_0: quantize_q4_0, GGMLType.Q4_1: quantize_q4_1}


def dequantize_reference(ggml_type: int, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """What llama.cpp's dequantize_row_* gives, in float32, independent of MLX."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if ggml_type == GGMLType.F32:
        return raw.view(np.float32).reshape(shape)
    if ggml_type == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    _, block_bytes = GGML_BLOCK_LAYOUT[GGMLType(ggml_type)]
    blocks = raw.reshape(-1, block_bytes)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if ggml_type == GGMLType.Q8_0:
        values = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
        packed = blocks[:, 4:] if ggml_type == GGMLType.Q4_1 else blocks[:, 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        if ggml_type == GGMLType.Q4_1:
            values = d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        else:
            values = d * (q - 8)
    return values.reshape(shape)


def encode_tensor(ggml_type: int, x: np.ndarray) -> tuple[int, tuple[int, ...], bytes]:
    """(type, shape, bytes) for write_gguf, quantizing when the type asks for it."""
    x = np.asarray(x, dtype=np.float32)
    if ggml_type == GGMLType.F32:
        data = x.tobytes()
    elif ggml_type == GGMLType.F16:
        data = x.astype(np.float16).tobytes()
    else:
        data = QUANTIZERS[GGMLType(ggml_type)](x)
    return int(ggml_type), tuple(x.shape), data


def byte_level_vocab_metadata(pre: str = "smollm") -> dict[str, Any]:
    """A minimal GPT-2 style tokenizer: the 256 byte symbols, two merges, two control tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, "Ġt", "Ġth"]
    token_types = [3, 3] + [1] * (len(tokens) - 2)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": int32_array(token_types),
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }


def llama_metadata(config: dict[str, Any], arch: str = "llama") -> dict[str, Any]:
    """``llama.*`` keys for an mlx-lm llama config (as llama.cpp's converter writes them)."""
    return {
        "general.architecture": arch,
        "general.alignment": 32,
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.dimension_count": config["head_dim"],
        f"{arch}.rope.freq_base": float(config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{arch}.context_length": config["max_position_embeddings"],
    }


def tiny_llama_gguf(path: Path, weight_type: int = GGMLType.F32,
                    type_overrides: dict[str, int] | None = None, **config_overrides: Any):
    """A GGUF of mlxkv's tiny random llama, laid out as llama.cpp's converter does (Q/K rows
    permuted for interleaved rotary). Returns (path, the mlx-lm model it came from).

    ``weight_type`` applies to 2-D weights; ``type_overrides`` maps GGUF tensor names to types.
    1-D norms stay F32, as in llama.cpp files.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import permute_weights, translate_weight_names

    from mlxkv.loading.tiny import tiny_config, tiny_model

    vocab = byte_level_vocab_metadata()
    config = tiny_config("llama", vocab_size=len(vocab["tokenizer.ggml.tokens"]), **config_overrides)
    model = tiny_model("llama", **config_overrides, vocab_size=config["vocab_size"])
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if name.endswith("self_attn.q_proj.weight"):
            array = np.array(permute_weights(value, config["num_attention_heads"]))
        elif name.endswith("self_attn.k_proj.weight"):
            array = np.array(permute_weights(value, config["num_attention_heads"],
                                             config["num_key_value_heads"]))
        gguf_name = translate_weight_names(name)
        ggml_type = GGMLType.F32 if array.ndim == 1 else weight_type
        ggml_type = (type_overrides or {}).get(gguf_name, ggml_type)
        tensors[gguf_name] = encode_tensor(ggml_type, array)
    write_gguf(path, {**llama_metadata(config), **vocab}, tensors)
    return path, model
