"""Tiny GGUF files written with ``gguf``'s own GGUFWriter, the way llama.cpp's converter writes them.

Each follows ``convert_hf_to_gguf.py``'s documented conventions, spelled out here and not
taken from mlxkv: llama.cpp's tensor names, llama's Q/K rows permuted for interleaved
rotary (mlx-lm's own GGUF exporter does the permutation), Gemma's RMSNorm weights stored
plus one, Gemma 3 tied embeddings and the metadata keys each model class writes (Gemma 3's
sliding-window period and local rope base are left out, as llama.cpp hard-codes them: so
the tiny Gemma uses llama.cpp's values, every 6th layer global, local base 10,000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from tokenizers import pre_tokenizers

from mlxkv.loading.tiny import tiny_config, tiny_model

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
MLX_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma3": {"num_hidden_layers": 7, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
               "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 16},
}

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GEMMA3_LAYER_NAMES = {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str, arch: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names)."""
    module, suffix = hf_name.rsplit(".", 1)
    parts = module.split(".")
    if parts[:2] == ["model", "layers"]:
        table = GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES
        return f"blk.{parts[2]}.{table['.'.join(parts[3:])]}.{suffix}"
    return f"{GLOBAL_NAMES[module]}.{suffix}"


# -- vocabularies --------------------------------------------------------------------------------
def byte_level_vocab(writer: gguf.GGUFWriter, pre: str) -> int:
    """A GPT-2 style vocabulary: two control tokens, the 256 byte symbols, two merges."""
    tokens = ["<|endoftext|>", "<|im_start|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "Ġth"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    return len(tokens)


def sentencepiece_vocab(writer: gguf.GGUFWriter) -> int:
    """A Gemma-style SentencePiece vocabulary: specials, <0xNN> byte tokens, a few pieces with scores."""
    pieces = ["\u2581", "\u2581t", "\u2581th", "\u2581the", "he", "<start_of_turn>", "<end_of_turn>"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(pieces) - 2) + [3, 3]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    return len(tokens)


# -- tensors ---------------------------------------------------------------------------------------
def encode(writer: gguf.GGUFWriter, name: str, values: np.ndarray, kind: Q) -> None:
    """Add one tensor stored as ``kind``, quantized by ``gguf`` itself, or random blocks of a
    type it cannot write (K-quants, i-quants: the tensor then no longer holds ``values``)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if kind == Q.F32:
        writer.add_tensor(name, values)
    elif kind == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        try:
            stored = gguf.quants.quantize(values, kind)
        except NotImplementedError:
            stored = random_blocks(values.shape, kind)
        writer.add_tensor(name, stored, raw_dtype=kind)


def random_blocks(shape: tuple[int, ...], kind: Q, seed: int = 0) -> np.ndarray:
    """Random stored bytes of a type ``gguf`` can decode but not write (K-quants, i-quants).
    Every byte stays below 0x3C, so each float16 scale inside a block is finite and below 1."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0x3C, size=(shape[0], shape[1] // block * size), dtype=np.uint8)


def write_tiny_gguf(path: Path, arch: str = "llama", weight_type: Q = Q.F32,
                    type_overrides: dict[str, Q] | None = None, metadata: dict[str, Any] | None = None,
                    **config_overrides: Any):
    """A GGUF of mlxkv's tiny random ``arch`` model laid out as llama.cpp's converter does.
    Returns (path, the float32 mlx-lm model it came from). ``weight_type`` applies to 2-D
    weights, ``type_overrides`` maps GGUF tensor names to types; 1-D norms and biases stay F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = sentencepiece_vocab(writer) if arch == "gemma3" else byte_level_vocab(
        writer, "smollm" if arch == "llama" else "qwen2")
    overrides = {**ARCH_OVERRIDES.get(arch, {}), **config_overrides, "vocab_size": vocab_size}
    config = tiny_config(MLX_ARCH[arch], **overrides)
    model = tiny_model(MLX_ARCH[arch], **overrides)
    if arch == "gemma3":  # Gemma 3 always ties its output to the embedding (mlx-lm's sanitize does this)
        model.tie_word_embeddings = True
        model.pop("lm_head")
    _write_metadata(writer, arch, config)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value[0], value[1])
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            from mlx_lm.gguf import permute_weights

            heads = config["num_attention_heads"]
            kv_heads = config["num_key_value_heads"] if ".k_proj" in name else None
            array = np.array(permute_weights(mx.array(array), heads, kv_heads))
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0  # convert_hf_to_gguf: Gemma3Model adds norm_shift to every norm weight
        tensor_name = gguf_name(name, arch)
        kind = Q.F32 if array.ndim == 1 else weight_type
        encode(writer, tensor_name, array, (type_overrides or {}).get(tensor_name, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def _write_metadata(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    """The keys convert_hf_to_gguf's model class for ``arch`` writes."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
