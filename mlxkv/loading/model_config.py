"""A model's config and weight size without its weights: what ``mlxkv plan`` reads.

- a Hugging Face repo id: ``config.json`` and the safetensors headers only (never the weights);
  with no network it fails at once instead of retrying for 25 s,
- a local model directory: its ``config.json`` and the sizes of its safetensors files,
- a ``.gguf`` file or a short model name: its header read with ``gguf`` (never the tensor data)
  through the importer's own config builder,
- a ``config.json`` file alone: weights estimated from the parameter count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxkv.errors import UserError


@dataclass(frozen=True)
class ModelSource:
    """What the planner knows about a model before loading it.

    ``stored_bytes``: weights as stored (what a Mac loads), None if unknown;
    ``parameters``: parameter count when the source tells it (GGUF tensor shapes).
    """

    name: str
    kind: str  # "hub", "directory", "gguf" or "config"
    config: dict[str, Any]
    stored_bytes: int | None = None
    parameters: int | None = None


def model_source(model: str | None = None, config_path: str | None = None) -> ModelSource:
    """Resolve ``--model`` (short name, repo id, directory, .gguf; None = the default model) or ``--config``."""
    from mlxkv.loading.models import default_model_path, named_model_path

    if config_path is not None:
        return ModelSource(config_path, "config", read_config_json(Path(config_path).expanduser()))
    if model is None:
        return gguf_source(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return directory_source(path)
    if not path.exists() and (gguf_path := named_model_path(model)) is not None:
        return gguf_source(gguf_path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_source(path)
        if path.suffix.lower() == ".json":
            return ModelSource(model, "config", read_config_json(path))
        raise UserError(f"{model} is neither a .gguf file nor a config.json; pass a model directory, "
                        "a .gguf file, a Hugging Face repo id or --config config.json")
    from mlxkv.loading.loader import looks_like_path

    if looks_like_path(model):
        raise UserError(f"no such file or directory: {model}")
    return hub_source(model)


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a dict, or a one-line UserError."""
    if not path.is_file():
        raise UserError(f"no such config file: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as JSON ({e}); pass the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object; pass the model's config.json")
    return config


def weights_bytes(source: ModelSource, dtype_bytes: int) -> tuple[int, str]:
    """(bytes, how they were found) for the weights as loaded with ``dtype_bytes``-byte floats.

    4 bytes means a CPU device, where mlxkv expands quantized weights to float32: parameters
    x 4. Otherwise the weights as stored; for a bare config, the layers its ``quantization``
    block quantizes (as mlx-lm's loader does) packed, and the rest at ``dtype_bytes``.
    """
    from mlxkv.memory.layout import parameter_count

    if dtype_bytes != 4 and source.stored_bytes:
        return source.stored_bytes, "as stored"
    if dtype_bytes != 4 and (quantization := mlx_quantization(source.config)) is not None:
        packed = quantized_weights_bytes(source.config, dtype_bytes)
        if packed is not None:
            mode = quantization.get("mode", "affine")
            scheme = f"{quantization['bits']}-bit g{quantization['group_size']}" + ("" if mode == "affine" else f" {mode}")
            return packed, f"{scheme} as the config's quantization block says, other tensors x {dtype_bytes} bytes"
    params = source.parameters or parameter_count(source.config)
    if params is None:
        raise UserError(
            f"cannot tell the weights' size of {source.name} (mlx-lm does not know its architecture); "
            "pass --weights-bytes, e.g. --weights-bytes 4.5GB"
        )
    if dtype_bytes == 4:
        how = "expanded to float32 as on a CPU device"
    elif _quantization_block(source.config) is not None:
        how = "an estimate: the config's quantization is not one mlx-lm stores packed"
    else:
        how = "unquantized"
    return params * dtype_bytes, f"{params / 1e6:,.1f}M parameters x {dtype_bytes} bytes, {how}"


# -- quantized configs ---------------------------------------------------------------------------
# mlx-lm's loader (mlx_lm.utils.load_model) reads the "quantization" block, and a few
# "quantization_config" methods it maps onto the same affine/microscaling formats.
_MLX_QUANT_METHODS = {"mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
                      "mxfp8": {"group_size": 32, "bits": 8, "mode": "mxfp8"}}


def _quantization_block(config: dict[str, Any]) -> dict[str, Any] | None:
    for owner in (config, config.get("text_config") or {}):
        for key in ("quantization", "quantization_config"):
            if isinstance(owner.get(key), dict):
                return owner[key]
    return None


def mlx_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The config's quantization as mlx-lm's loader applies it (``bits``, ``group_size``,
    ``mode`` and per-module overrides keyed by module path), or None when the weights are
    not stored packed in an MLX format."""
    block = _quantization_block(config)
    if block is None:
        return None
    if "bits" in block and "group_size" in block and "quant_method" not in block:
        return block
    return _MLX_QUANT_METHODS.get(str(block.get("quant_method")))


def quantized_weights_bytes(config: dict[str, Any], dtype_bytes: int) -> int | None:
    """Bytes of the weights mlx-lm holds for a quantized ``config``: its model built lazily (no
    weights are allocated) and quantized the way ``mlx_lm.convert`` wrote it (the config's
    per-module overrides, else every layer with ``to_quantized`` whose input divides the
    group size and that the model's own ``quant_predicate`` accepts). Packed data and
    integer scales count as they are; floating tensors (16-bit scales and biases, norms,
    unquantized layers) at ``dtype_bytes``. None when mlx-lm cannot build the model.

    A layer that ``mlx_lm.convert`` skipped without writing it in the config (a custom
    predicate returning False) cannot be told from the config alone: it counts as quantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxkv.memory.layout import _build_lazily  # the planner's lazy build: one rule for both

    quantization = mlx_quantization(config)
    built = _build_lazily(config) if quantization is not None else None
    if built is None:
        return None
    model = built[0]
    group_size = int(quantization["group_size"])
    own_predicate = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return own_predicate(path, module) if own_predicate is not None else True

    try:
        nn.quantize(model, group_size, int(quantization["bits"]), mode=quantization.get("mode", "affine"),
                    class_predicate=predicate)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot apply the config's quantization block ({e}); pass --weights-bytes") from None
    return sum(v.nbytes if mx.issubdtype(v.dtype, mx.integer) else v.size * dtype_bytes
               for _, v in tree_flatten(model.parameters()))


# -- local directory -------------------------------------------------------------------------
def directory_source(path: Path) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; pass a model directory, a .gguf file or --config")
    config = read_config_json(config_file)
    index = path / "model.safetensors.index.json"
    stored = None
    if index.is_file():
        try:
            stored = int(json.loads(index.read_text())["metadata"]["total_size"])
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
            stored = None
    if stored is None:
        files = list(path.glob("*.safetensors"))
        stored = sum(f.stat().st_size for f in files) if files else None
    return ModelSource(str(path), "directory", config, stored_bytes=stored)


# -- GGUF -------------------------------------------------------------------------------------
def gguf_source(path: Path) -> ModelSource:
    """Config and sizes of a GGUF file from its header, read with ``gguf`` (never the tensor data;
    10 s for Gemma 3, whose 262K-token vocabulary the reader parses whole). The config is the one
    an import writes; the sizes are the file's own (K-quants take more once imported: float16)."""
    from mlxkv.loading.gguf_file import GGUFFile
    from mlxkv.loading.gguf_import import gguf_model_config

    gguf = GGUFFile(path)
    return ModelSource(str(path), "gguf", gguf_model_config(gguf), stored_bytes=gguf.stored_bytes or None,
                       parameters=gguf.parameters or None)


# -- Hugging Face Hub ------------------------------------------------------------------------
def hub_source(repo_id: str) -> ModelSource:
    """config.json and the safetensors headers (HTTP range reads), never the weights."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from mlxkv.loading.loader import hub_reachable

    try:
        try:
            config_file = hf_hub_download(repo_id, "config.json", local_files_only=True)
        except Exception:  # not cached: ask the Hub, if it can be reached at all
            if not hub_reachable():
                raise _hub_error(repo_id, OSError("unreachable")) from None
            config_file = hf_hub_download(repo_id, "config.json")
        config = read_config_json(Path(config_file))
    except UserError:
        raise
    except Exception as e:
        raise _hub_error(repo_id, e) from None
    try:
        if not hub_reachable():
            raise OSError("unreachable")
        metadata = get_safetensors_metadata(repo_id)
        stored = sum(
            t.data_offsets[1] - t.data_offsets[0]
            for f in metadata.files_metadata.values() for t in f.tensors.values()
        )
    except Exception:  # no safetensors (or offline by now): estimate from the parameter count
        stored = None
    return ModelSource(repo_id, "hub", config, stored_bytes=stored or None)


def _hub_error(repo_id: str, error: Exception) -> UserError:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its license on the Hub and log in (hf auth login), "
                         "or pass its config.json with --config")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(f"no model '{repo_id}' on the Hugging Face Hub (or it is private); check the id, "
                         "or pass a local directory, a .gguf file or --config config.json")
    if isinstance(error, errors.HFValidationError):
        return UserError(f"'{repo_id}' is neither a file nor a Hugging Face repo id (org/name)")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return UserError(f"{repo_id} has no config.json; pass --config with the model's config")
    if isinstance(error, OSError):  # offline (LocalEntryNotFoundError) or another network failure
        return UserError(f"cannot reach the Hugging Face Hub for {repo_id}'s config.json and it is not "
                         "cached; connect, or pass --config config.json or a local directory")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return UserError(f"cannot read {repo_id}'s config from the Hugging Face Hub: {first_line}")
