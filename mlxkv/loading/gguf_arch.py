"""llama.cpp's conversion conventions per architecture, undone for mlx-lm.

The libraries do most of it: transformers' ``GGUF_CONFIG_MAPPING`` renames the metadata
keys into config.json fields, and ``gguf``'s ``TensorNameMap`` knows each architecture's
tensor names, so the GGUF name of every mlx-lm parameter is asked of it. What neither
says is what llama.cpp's ``convert_hf_to_gguf.py`` changed on the way and what its C++
hard-codes instead of writing it down; that is this module:

- llama: Q and K rows permuted for llama.cpp's interleaved rotary layout. MLX's
  "traditional" rope is that same rotation, so the rows stay and the config says
  ``rope_traditional: true``; a ``rope_freqs`` tensor becomes Llama 3's ``rope_scaling``.
- gemma3: every RMSNorm weight stored plus 1 (Gemma computes ``x * (1 + w)``); every 6th
  layer global, the others a sliding window with rope base 10,000 (the file gives only the
  global base, 1e6); attention scaled by 1/sqrt(head_dim), by hidden/heads on the 27B model.
- qwen2, qwen3: stored as Hugging Face has them.

Only the architectures listed in ``ARCHITECTURES`` are imported; another one is refused
in one line, since a silent convention would give a model that runs and talks nonsense.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.errors import UserError

ROPE_FREQS_TENSOR = "rope_freqs.weight"  # Llama 3.1+ long-context rotary factors
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp: rope_freq_base_train_swa for LLM_ARCH_GEMMA3
GEMMA3_27B_LAYERS = 62  # llama.cpp scales the 27B model's queries by hidden/heads, the others by head_dim

GGUF_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "phi3": "phi3", "starcoder2": "starcoder2", "granite": "granite", "olmo2": "olmo2",
    "deepseek2": "deepseek_v2", "cohere2": "cohere2", "exaone": "exaone", "smollm3": "smollm3",
}
"""GGUF ``general.architecture`` -> mlx-lm model type, where the names differ or are known."""


def mlx_model_type(arch: str) -> str:
    return GGUF_MODEL_TYPES.get(arch, arch)


# -- config.json -----------------------------------------------------------------------------------
def config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str],
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A config.json for mlx-lm from GGUF metadata and tensor shapes (never tensor data).

    Fields the file lacks are left out, so a partial header still gives a partial config
    (the planner needs only the attention shape).
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError("the GGUF file does not name its architecture (general.architecture)")
    names = set(tensor_names)

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    # transformers' table of llama.cpp key -> config field; its llama entry for architectures it lacks
    renames = {**GGUF_CONFIG_MAPPING.get(arch, GGUF_CONFIG_MAPPING["llama"]),
               "attention.key_length": "head_dim", "attention.value_length": "v_head_dim",
               "attention.sliding_window": "sliding_window", "attention.kv_lora_rank": "kv_lora_rank"}
    config: dict[str, Any] = {"model_type": mlx_model_type(arch)}
    for key, field in renames.items():
        if field is not None and get(key) is not None:
            config.setdefault(field, get(key))
    if get("attention.key_length") is not None:  # the head size is key_length where both are given
        config["head_dim"] = get("attention.key_length")
    if "head_dim" not in config and {"hidden_size", "num_attention_heads"} <= config.keys():
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]  # llama.cpp's default
    if config.get("v_head_dim") == config.get("head_dim"):
        config.pop("v_head_dim", None)
    if "kv_lora_rank" in config and get("rope.dimension_count") is not None:
        config["qk_rope_head_dim"] = get("rope.dimension_count")
    if "token_embd.weight" in shapes:
        config["vocab_size"] = shapes["token_embd.weight"][0]
    config["tie_word_embeddings"] = "output.weight" not in names
    for field, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),):
        if metadata.get(key) is not None:
            config[field] = metadata[key]
    if (scaling := _linear_rope_scaling(metadata, arch)) is not None:
        config["rope_scaling"] = scaling
    if arch in ARCHITECTURES:
        ARCHITECTURES[arch].adjust_config(config, metadata, names)
    return config


def _linear_rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise UserError(f"GGUF rotary scaling '{kind}' is not supported (only linear and Llama 3)")


def _llama_config(config: dict[str, Any], metadata: dict[str, Any], names: set[str]) -> None:
    config["rope_traditional"] = True  # Q/K rows in llama.cpp's interleaved layout: the same rotation
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    config.pop("v_head_dim", None)


def _gemma3_config(config: dict[str, Any], metadata: dict[str, Any], names: set[str]) -> None:
    config["sliding_window_pattern"] = _window_period(
        metadata.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN))
    config["rope_local_base_freq"] = GEMMA3_LOCAL_ROPE_BASE
    if "head_dim" in config:
        wide = config.get("num_hidden_layers") == GEMMA3_27B_LAYERS and "hidden_size" in config
        config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if wide
                                           else config["head_dim"])


def _window_period(pattern: int | list[bool]) -> int:
    """mlx-lm's one period P (layer i global iff (i + 1) % P == 0) from an int or llama.cpp's
    per-layer list of "is a sliding layer"."""
    if isinstance(pattern, int):
        return pattern
    for period in range(1, len(pattern) + 2):
        if [(i + 1) % period != 0 for i in range(len(pattern))] == [bool(x) for x in pattern]:
            return period
    raise UserError("the GGUF's per-layer sliding-window pattern has no fixed period, which mlx-lm's gemma3 needs")


@dataclass(frozen=True)
class Architecture:
    """What importing one GGUF architecture takes beyond the libraries' tables."""

    adjust_config: Callable[[dict[str, Any], dict[str, Any], set[str]], None] = lambda *_: None
    norm_shift: float = 0.0  # convert_hf_to_gguf added this to every "...norm.weight"
    required: tuple[str, ...] = ("hidden_size", "num_hidden_layers", "intermediate_size",
                                 "num_attention_heads", "rms_norm_eps")


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(adjust_config=_llama_config),
    "qwen2": Architecture(),
    "qwen3": Architecture(),
    "gemma3": Architecture(adjust_config=_gemma3_config, norm_shift=1.0),
}
"""GGUF architectures mlxkv imports, each checked against mlx-lm's model by a test."""


def check_architecture(arch: str, file_name: str) -> Architecture:
    """The conventions of ``arch``, or a one-line UserError that says why not."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    supported = ", ".join(ARCHITECTURES)
    if importlib.util.find_spec(f"mlx_lm.models.{mlx_model_type(arch)}") is None:
        raise UserError(f"{file_name}: GGUF architecture '{arch}' is not implemented by mlx-lm; "
                        f"mlxkv imports {supported} GGUF files")
    raise UserError(f"{file_name}: mlxkv does not import GGUF architecture '{arch}' yet (only {supported}); "
                    "convert the Hugging Face model with mlx_lm.convert and pass its directory")


def check_config(config: dict[str, Any], arch: Architecture, file_name: str) -> None:
    missing = [field for field in arch.required if field not in config]
    if missing:
        raise UserError(f"{file_name}: the GGUF metadata lacks the model's {missing[0]}; the file is incomplete")
    if config.get("v_head_dim", config.get("head_dim")) != config.get("head_dim"):
        raise UserError(f"{file_name}: different key and value head sizes are not supported")


# -- tensors ----------------------------------------------------------------------------------------
def build_model(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model for ``config``, with lazy (never computed) initial weights."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    try:
        return module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"mlx-lm cannot build a {config['model_type']} model from the GGUF metadata: {e}") from None


def gguf_names(model_params: Iterable[str], arch: str, num_layers: int) -> dict[str, str]:
    """mlx-lm parameter name -> GGUF tensor name, from ``gguf``'s table for ``arch``."""
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(arch_ids[arch], num_layers)
    names = {}
    for param in model_params:
        gguf_name = table.get_name(param, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            names[param] = gguf_name
    return names


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
        raise UserError("the GGUF's rope_freqs tensor does not match Llama 3 rotary scaling; cannot import it")
    return scaling
