"""Import a GGUF file into an mlx-lm model directory that plain ``mlx_lm.load`` reads.

``gguf`` reads and dequantizes the file, transformers builds the tokenizer and names the
config fields, ``gguf``'s tensor-name table maps mlx-lm's parameters to the file's tensors,
and ``gguf_arch`` undoes llama.cpp's conversion conventions. Weights are stored as
``gguf_weights`` says: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 kept packed in MLX's affine layout (bit
for bit), every other quantized type as float16.

Everything is checked before anything is written (architecture, tensor types, names and
shapes against mlx-lm's model), and the files go to a temporary sibling directory first, so
an interrupted import leaves no half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxkv.errors import UserError
from mlxkv.loading.gguf_arch import (
    ARCHITECTURES, ROPE_FREQS_TENSOR, Architecture, build_model, check_architecture, check_config,
    config_from_gguf, gguf_names, llama3_rope_scaling,
)
from mlxkv.loading.gguf_file import GGUFFile, GGUFTensor
from mlxkv.loading.gguf_weights import AFFINE_BLOCKS, convert_tensor, quantization_config, stored_dtype
from mlxkv.loading.tokenizer import end_of_generation_ids, tokenizer_from_gguf, write_hf_tokenizer

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
PACKED_TENSOR_TYPES = tuple(AFFINE_BLOCKS)
IMPORT_FORMAT_VERSION = 2  # bump when the written directory changes: cached imports are redone


def _check_decodable(gguf: GGUFFile) -> None:
    for tensor in gguf.tensors.values():
        if not tensor.decodable:
            file_type = f" (a {gguf.file_type_name} file)" if gguf.file_type_name else ""
            raise UserError(f"{gguf.path.name}: tensor '{tensor.name}' is stored as {tensor.type_name}{file_type}, "
                            "which the gguf package cannot decode; use a file quantized to another type")


def gguf_model_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json an import of ``gguf`` writes (no tensor data read, but for rope_freqs)."""
    shapes = {name: t.shape for name, t in gguf.tensors.items()}
    config = config_from_gguf(gguf.metadata, shapes, shapes)
    if ROPE_FREQS_TENSOR in gguf.tensors and "head_dim" in config:
        factors = mx.array(gguf.tensors[ROPE_FREQS_TENSOR].to_float32())
        config["rope_scaling"] = llama3_rope_scaling(factors, config["head_dim"], float(config.get("rope_theta", 1e4)))
    eos = end_of_generation_ids(gguf.metadata)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _match_tensors(gguf: GGUFFile, arch_name: str, model: nn.Module, config: dict[str, Any]) -> dict[str, GGUFTensor]:
    """mlx-lm parameter name -> the GGUF tensor that holds it, every name and shape checked."""
    params = dict(tree_flatten(model.parameters()))
    names = gguf_names(params, arch_name, config["num_hidden_layers"])
    matched, missing = {}, []
    for param, value in params.items():
        tensor = gguf.tensors.get(names.get(param, ""))
        if tensor is None:
            if not (param.startswith("lm_head.") and config["tie_word_embeddings"]):
                missing.append(names.get(param, param))
            continue
        if tensor.shape != tuple(value.shape):
            raise UserError(f"{gguf.path.name}: tensor '{tensor.name}' has shape {list(tensor.shape)} where mlx-lm's "
                            f"{config['model_type']} model expects {list(value.shape)}; the metadata and tensors disagree")
        matched[param] = tensor
    if missing:
        raise UserError(f"{gguf.path.name}: incomplete {arch_name} GGUF, missing tensors such as {missing[0]}")
    unused = sorted(set(gguf.tensors) - {t.name for t in matched.values()} - {ROPE_FREQS_TENSOR})
    if unused:
        shown = ", ".join(unused[:4]) + (" ..." if len(unused) > 4 else "")
        raise UserError(f"{gguf.path.name}: tensors mlx-lm's {config['model_type']} model has no place for: {shown} "
                        "(a mixture-of-experts or multimodal file?)")
    return matched


def _convert(matched: dict[str, GGUFTensor], model: nn.Module, arch: Architecture) -> dict[str, mx.array]:
    packable = {f"{name}.weight" for name, module in model.named_modules()
                if isinstance(module, (nn.Linear, nn.Embedding))}
    weights: dict[str, mx.array] = {}
    for param, tensor in matched.items():
        values = None
        if arch.norm_shift and param.endswith("norm.weight"):
            values = tensor.to_float32() - arch.norm_shift
        elif stored_dtype(tensor) == "packed" and param not in packable:
            values = tensor.to_float32()
        prefix = param.removesuffix(".weight") if param.endswith(".weight") else None
        for suffix, array in convert_tensor(tensor, values).items():
            weights[param if prefix is None or suffix == "weight" else f"{prefix}.{suffix}"] = array
    return weights


def read_gguf_model(gguf_path: str | Path) -> tuple[GGUFFile, dict[str, Any], dict[str, mx.array]]:
    """(file, config.json, mlx-lm weights) of a GGUF file, every check done, nothing written."""
    gguf = GGUFFile(gguf_path)
    arch_name = gguf.architecture
    arch = check_architecture(arch_name, gguf.path.name)
    _check_decodable(gguf)
    config = gguf_model_config(gguf)
    check_config(config, arch, gguf.path.name)
    model = build_model(config)
    weights = _convert(_match_tensors(gguf, arch_name, model, config), model, arch)
    if (quantization := quantization_config(weights)) is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return gguf, config, weights


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` into the mlx-lm model directory ``out_dir`` and return it.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then only the files the import
    writes are replaced, and nothing is deleted.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; choose another or allow overwriting (--force)")
    gguf, config, weights = read_gguf_model(gguf_path)
    tokenizer = tokenizer_from_gguf(gguf.metadata)
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
