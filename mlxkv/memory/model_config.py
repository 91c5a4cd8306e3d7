"""A model's config and weight size without its weights: what ``mlxkv plan`` reads.

- a Hugging Face repo id: ``config.json`` and the safetensors headers only (never the weights),
- a local model directory: its ``config.json`` and the sizes of its safetensors files,
- a ``.gguf`` file: its header (metadata and tensor table, never the tensor data; ``mx.load``
  would read every tensor: 0.19 s and ~200 MB for the 98 MB default model, the header
  parser 0.07 s and nothing held),
- a ``config.json`` file alone: weights estimated from the parameter count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
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
    """Resolve ``--model`` (repo id, directory, .gguf; None = the default model) or ``--config``."""
    if config_path is not None:
        return ModelSource(config_path, "config", read_config_json(Path(config_path).expanduser()))
    if model is None:
        from mlxkv.loading import default_model_path

        return gguf_source(default_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return directory_source(path)
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
    x 4. Otherwise the weights as stored, or, for a bare config, parameters x dtype (an
    estimate that ignores quantization).
    """
    from mlxkv.memory.layout import parameter_count

    if dtype_bytes != 4 and source.stored_bytes:
        return source.stored_bytes, "as stored"
    params = source.parameters or parameter_count(source.config)
    if params is None:
        raise UserError(
            f"cannot tell the weights' size of {source.name} (mlx-lm does not know its architecture); "
            "pass --weights-bytes, e.g. --weights-bytes 4.5GB"
        )
    how = "expanded to float32 as on a CPU device" if dtype_bytes == 4 else "an estimate that ignores quantization"
    return params * dtype_bytes, f"{params / 1e6:,.1f}M parameters x {dtype_bytes} bytes, {how}"


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
GGUF_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "phi3": "phi3", "starcoder2": "starcoder2", "granite": "granite", "olmo2": "olmo2",
    "deepseek2": "deepseek_v2", "cohere2": "cohere2", "exaone": "exaone", "smollm3": "smollm3",
}
"""GGUF ``general.architecture`` -> mlx-lm model type, where the names differ or are known."""


def gguf_source(path: Path) -> ModelSource:
    """Config and sizes from a GGUF header; the tensor data is never read."""
    from mlxkv.loading.gguf_file import read_gguf_header

    header = read_gguf_header(path)
    stored = sum(t.nbytes or 0 for t in header.tensors) or None
    return ModelSource(
        str(path), "gguf", config_from_gguf(header.metadata, [t.name for t in header.tensors],
                                            {t.name: t.shape for t in header.tensors}),
        stored_bytes=stored,
        parameters=sum(prod(t.shape) for t in header.tensors) or None,
    )


def config_from_gguf(metadata: dict[str, Any], tensor_names: list[str],
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A config.json-like dict from GGUF metadata (``{arch}.block_count`` and friends)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError("the GGUF file does not name its architecture (general.architecture)")

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    config: dict[str, Any] = {"model_type": GGUF_MODEL_TYPES.get(arch, arch)}
    fields = {
        "hidden_size": "embedding_length",
        "num_hidden_layers": "block_count",
        "intermediate_size": "feed_forward_length",
        "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "v_head_dim": "attention.value_length",
        "sliding_window": "attention.sliding_window",
        "max_position_embeddings": "context_length",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
        "rope_theta": "rope.freq_base",
        "vocab_size": "vocab_size",
        "kv_lora_rank": "attention.kv_lora_rank",
    }
    for name, key in fields.items():
        if get(key) is not None:
            config[name] = get(key)
    if config.get("v_head_dim") == config.get("head_dim"):
        config.pop("v_head_dim", None)
    if "kv_lora_rank" in config and get("rope.dimension_count") is not None:
        config["qk_rope_head_dim"] = get("rope.dimension_count")
    if "vocab_size" not in config and "token_embd.weight" in shapes:
        config["vocab_size"] = shapes["token_embd.weight"][0]
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    return config


# -- Hugging Face Hub ------------------------------------------------------------------------
def hub_source(repo_id: str) -> ModelSource:
    """config.json and the safetensors headers (HTTP range reads), never the weights."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = read_config_json(Path(hf_hub_download(repo_id, "config.json")))
    except UserError:
        raise
    except Exception as e:
        raise _hub_error(repo_id, e) from None
    try:
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
