"""Tiny random-weight models built from mlx-lm's own model classes, for fast tests and benches.

Each architecture keeps the feature a KV cache must cope with (GQA, sliding-window
layers, attention sinks, recurrent ``ArraysCache`` layers) at a size that runs in
milliseconds on a CPU: hidden 64, 2-4 layers, 4 query heads over 2 KV heads, vocab 256.
Weights come from a fixed seed, in float32.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxkv.errors import UserError

TINY_VOCAB_SIZE = 256

_SHARED: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY_VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# mlx-lm model module -> config (what config.json would hold for it)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_SHARED, "model_type": "llama", "head_dim": 16},
    "qwen2": {**_SHARED, "model_type": "qwen2"},  # q/k/v biases; head_dim = 64 / 4
    "qwen3": {**_SHARED, "model_type": "qwen3", "head_dim": 32},  # q/k norms
    "phi3": {**_SHARED, "model_type": "phi3", "tie_word_embeddings": False},  # fused qkv
    "gemma3_text": {  # local sliding-window layers alternating with global ones
        **_SHARED,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
    },
    "gpt_oss": {  # attention sinks as parameters, sliding + full layers, mixture of experts
        **_SHARED,
        "model_type": "gpt_oss",
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
    },
    "lfm2": {  # hybrid: short-convolution layers keep their state in ArraysCache
        **_SHARED,
        "model_type": "lfm2",
        "num_hidden_layers": 4,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
    },
}
TINY_ARCHS = tuple(TINY_CONFIGS)

SMOLLM2_ATTENTION: dict[str, int] = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
"""The default model's (SmolLM2-135M) attention shape: the part of a model a KV cache changes.
Benches give tiny models this shape so cache costs match the real model's per layer."""


def tiny_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    """The config dict of a tiny ``arch`` model, with ``overrides`` applied."""
    if arch not in TINY_CONFIGS:
        raise UserError(f"no tiny model for '{arch}'; choose one of: {', '.join(TINY_ARCHS)}")
    return {**TINY_CONFIGS[arch], **overrides}


def tiny_model(arch: str = "llama", *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A float32 mlx-lm ``arch`` model with seeded random weights (same seed, same weights).

    Parameters mlx-lm initializes to zero but that matter to a cache (gpt_oss's attention
    sinks) are drawn at random too, so tests exercise them.
    """
    config = tiny_config(arch, **overrides)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    sinks = [(name, mx.random.normal(value.shape)) for name, value in tree_flatten(model.parameters())
             if name.endswith(".sinks")]
    if sinks:
        model.load_weights(sinks, strict=False)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    model.eval()
    return model
