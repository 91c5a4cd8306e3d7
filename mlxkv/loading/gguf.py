"""Import a llama-architecture GGUF file into an mlx-lm model directory.

``mx.load`` reads GGUF natively and hands Q4_0/Q4_1/Q8_0 tensors over already in MLX's
affine quantized layout (packed uint32 weight, float16 scales and biases, groups of 32),
so the import only renames tensors, writes config.json and rebuilds the tokenizer; the
packed weights are saved as they are. The result loads with plain ``mlx_lm.load``.

llama.cpp stores Q and K rows permuted for its interleaved ("normal") rotary layout;
instead of undoing that permutation, the config says ``rope_traditional: true``, which
is the same rotation in MLX.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxkv.errors import UserError
from mlxkv.loading.gguf_file import GGMLType, GGUFHeader, read_gguf_header
from mlxkv.loading.tokenizer import tokenizer_from_gguf, write_hf_tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TENSOR_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
GGUF_GROUP_SIZE = 32  # every GGUF block type MLX unpacks holds 32 weights per scale
IMPORT_FORMAT_VERSION = 1  # bump when the written directory changes: cached imports are redone

# GGUF tensor name -> mlx-lm (Hugging Face) module path
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # Llama 3.1+ long-context rotary factors
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|scales|biases|bias)")


def _supported_types_text() -> str:
    return ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)


def check_supported(header: GGUFHeader) -> None:
    """Refuse, in one line, a file this importer would convert wrongly or not at all."""
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{header.path.name}: GGUF architecture '{arch}' is not supported; "
            f"mlxkv imports {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files "
            "(or pass a Hugging Face / mlx-lm model directory)"
        )
    for tensor in header.tensors:
        if tensor.ggml_type not in SUPPORTED_TENSOR_TYPES:
            file_type = f" (a {header.file_type_name} file)" if header.file_type_name else ""
            raise UserError(
                f"{header.path.name}: tensor '{tensor.name}' is stored as {tensor.type_name}{file_type}; "
                f"mlxkv imports GGUF tensors of types {_supported_types_text()} only"
            )


def hf_tensor_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``; None if unknown."""
    if match := _LAYER_NAME.fullmatch(gguf_name):
        layer, tensor, suffix = match.groups()
        if tensor in LAYER_TENSORS:
            return f"model.layers.{layer}.{LAYER_TENSORS[tensor]}.{suffix}"
        return None
    if (match := _GLOBAL_NAME.fullmatch(gguf_name)) and match.group(1) in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    return None


def _rename_tensors(path: Path, gguf_weights: dict[str, mx.array]) -> dict[str, mx.array]:
    renamed, unknown = {}, []
    for name, array in gguf_weights.items():
        if name == ROPE_FREQS_TENSOR:
            continue  # becomes config["rope_scaling"]
        hf_name = hf_tensor_name(name)
        if hf_name is None:
            unknown.append(name)
        else:
            renamed[hf_name] = array
    if unknown:
        shown = ", ".join(sorted(unknown)[:4]) + (" ..." if len(unknown) > 4 else "")
        raise UserError(
            f"{path.name}: unexpected tensors for a llama model: {shown}; "
            "mlxkv imports plain llama GGUF files (no MoE or multimodal tensors)"
        )
    return renamed


def _check_complete(path: Path, weights: dict[str, mx.array], num_layers: int) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{module}.weight" for i in range(num_layers) for module in LAYER_TENSORS.values()
    ]
    missing = [name for name in required if name not in weights]
    if missing:
        raise UserError(f"{path.name}: incomplete llama GGUF, missing tensors such as {missing[0]}")


def _quantized_bits(weights: dict[str, mx.array]) -> dict[str, int | None]:
    """Module path -> bits of its packed weight, or None for a 2-D float weight."""
    bits: dict[str, int | None] = {}
    for name, array in weights.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or array.ndim != 2:
            continue
        scales = weights.get(f"{module}.scales")
        bits[module] = None if scales is None else array.shape[-1] // scales.shape[-1]
    return bits


def quantization_config(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the most common bit width as the default, with a
    per-module entry (keyed by module path, as ``mlx_lm.utils.load_model`` reads it) for
    each module packed differently, and ``False`` for modules the GGUF keeps in float."""
    bits = _quantized_bits(weights)
    counts = Counter(b for b in bits.values() if b is not None)
    if not counts:
        return None
    default_bits = counts.most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": default_bits}
    for module, module_bits in sorted(bits.items()):
        if module_bits is None:
            config[module] = False
        elif module_bits != default_bits:
            config[module] = {"group_size": GGUF_GROUP_SIZE, "bits": module_bits}
    return config


def llama3_rope_scaling(freq_factors: mx.array, head_dim: int, rope_theta: float) -> dict[str, Any]:
    """The ``rope_scaling`` dict that reproduces a GGUF's ``rope_freqs`` tensor with
    mlx-lm's Llama3RoPE, or UserError if no standard Llama 3 setting matches it."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    factors = freq_factors.astype(mx.float32)
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max().item()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base_freqs = rope_theta ** (mx.arange(0, head_dim, 2) / head_dim)
    rope = Llama3RoPE(head_dim, base=rope_theta, scaling_config=scaling)
    if factors.shape != base_freqs.shape or not mx.allclose(rope._freqs / base_freqs, factors, rtol=1e-3):
        raise UserError(
            "the GGUF's rope_freqs tensor does not match Llama 3 rotary scaling; cannot import it"
        )
    return scaling


def _rope_scaling(meta: dict[str, Any], gguf_weights: dict[str, mx.array], head_dim: int,
                  rope_theta: float) -> dict[str, Any] | None:
    if ROPE_FREQS_TENSOR in gguf_weights:
        return llama3_rope_scaling(gguf_weights[ROPE_FREQS_TENSOR], head_dim, rope_theta)
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = float(meta.get("llama.rope.scaling.factor", 1.0))
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    raise UserError(f"GGUF rotary scaling '{kind}' is not supported (only linear and Llama 3)")


def _eos_token_ids(meta: dict[str, Any]) -> int | list[int] | None:
    """eos plus llama.cpp's other end-of-generation ids (end of turn / of message)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = list(dict.fromkeys(int(meta[k]) for k in keys if k in meta))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def llama_config(header: GGUFHeader, gguf_weights: dict[str, mx.array],
                 weights: dict[str, mx.array]) -> dict[str, Any]:
    """config.json for mlx-lm's llama model from the GGUF's ``llama.*`` metadata."""
    meta = header.metadata

    def required(key: str) -> Any:
        if key not in meta:
            raise UserError(f"{header.path.name}: GGUF metadata '{key}' is missing")
        return meta[key]

    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count",
                                                                      hidden_size // num_heads)))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{header.path.name}: partial rotary embeddings are not supported")
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise UserError(f"{header.path.name}: different key and value head sizes are not supported")
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": int(required("llama.block_count")),
        "intermediate_size": int(required("llama.feed_forward_length")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_traditional": True,  # GGUF's Q/K rows are in llama.cpp's interleaved layout
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in weights,
    }
    if (rope_scaling := _rope_scaling(meta, gguf_weights, head_dim, rope_theta)) is not None:
        config["rope_scaling"] = rope_scaling
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if (eos := _eos_token_ids(meta)) is not None:
        config["eos_token_id"] = eos
    if (quantization := quantization_config(weights)) is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def read_gguf(path: str | Path) -> tuple[GGUFHeader, dict[str, mx.array], dict[str, Any]]:
    """The checked header, MLX's arrays and the full metadata of a supported GGUF file."""
    header = read_gguf_header(path)
    check_supported(header)
    try:
        arrays, metadata = mx.load(str(header.path), return_metadata=True)
    except (RuntimeError, ValueError) as e:  # MLX's C++ reader: corrupt data past the header
        raise UserError(f"cannot read {header.path}: {e}") from None
    return header, arrays, metadata


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` into the mlx-lm model directory ``out_dir`` and return it.

    Everything is checked before anything is written. The files go to a temporary
    sibling directory first, so an interrupted import leaves no half-written model
    behind. A non-empty ``out_dir`` is refused unless ``overwrite``; then only the files
    the import writes are replaced, and nothing is deleted.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; choose another or allow overwriting (--force)")
    header, gguf_weights, metadata = read_gguf(gguf_path)
    weights = _rename_tensors(header.path, gguf_weights)
    config = llama_config(header, gguf_weights, weights)
    _check_complete(header.path, weights, config["num_hidden_layers"])
    tokenizer = tokenizer_from_gguf(metadata)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would carry over to the published directory
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_hf_tokenizer(tokenizer, staging)
        _publish(staging, out_dir)
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX failing to write (disk full)
        raise UserError(f"cannot write {out_dir}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # only the temporary directory created above
    return out_dir


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished files into place: one rename when ``out_dir`` is new, else file by file."""
    try:
        staging.rename(out_dir)
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    for file in staging.iterdir():
        os.replace(file, out_dir / file.name)
