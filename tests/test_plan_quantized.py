"""`mlxkv plan --config` reads the config's quantization block as mlx-lm's loader does: the
weights it plans are the bytes mlx-lm holds once it has loaded the quantized model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxkv.cli.main import main
from mlxkv.loading.model_config import model_source, weights_bytes
from mlxkv.loading.tiny import tiny_config


def _mlx_lm_checkpoint(tmp_path: Path, config: dict, group_size: int, bits: int, overrides: dict) -> Path:
    """A quantized float16 checkpoint written the way mlx_lm.convert writes one."""
    import mlx_lm.utils as mlx_lm_utils

    model_class, args_class = mlx_lm_utils._get_classes(config)  # what load_model uses
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float16)
    model, quantized = mlx_lm_utils.quantize_model(
        model, config, group_size, bits, quant_predicate=lambda path, module: overrides.get(path, True))
    out = tmp_path / "model"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(quantized))
    return out


def _loaded_bytes(directory: Path) -> int:
    """What mlx-lm's own loader holds for the checkpoint."""
    from mlx_lm.utils import load_model

    model, _ = load_model(directory)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("arch, group_size, bits, overrides", [
    ("llama", 64, 4, {}),
    # group 128: only down_proj (input 128) divides it; the others stay float16, as convert leaves them
    ("llama", 128, 4, {}),
    ("qwen3", 32, 3, {"model.layers.0.self_attn.q_proj": {"group_size": 64, "bits": 8},
                      "model.embed_tokens": {"group_size": 32, "bits": 6}}),
    ("llama", 32, 4, {"model.layers.1.mlp.up_proj": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}),
])
def test_planned_weights_are_what_mlx_lm_loads(tmp_path, capsys, arch, group_size, bits, overrides):
    checkpoint = _mlx_lm_checkpoint(tmp_path, tiny_config(arch), group_size, bits, overrides)
    expected = _loaded_bytes(checkpoint)
    planned, how = weights_bytes(model_source(config_path=str(checkpoint / "config.json")), 2)
    assert planned == expected
    assert f"{bits}-bit g{group_size}" in how


def test_llama_3_8b_4bit_from_quantized_linear_shapes(tmp_path, capsys):
    """mlx-community's Llama-3-8B 4-bit config: every Linear and the embedding become
    QuantizedLinear/QuantizedEmbedding with a uint32 weight of shape (out, in * bits / 32) and
    float16 scales and biases of shape (out, in / group_size); the RMS norms stay float16."""
    hidden, inter, layers, heads, kv_heads, vocab, head_dim = 4096, 14336, 32, 32, 8, 128256, 128
    config = {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "quantization": {"group_size": 64, "bits": 4},
    }

    def quantized(out: int, inp: int) -> int:
        return out * (inp * 4 // 32) * 4 + 2 * out * (inp // 64) * 2

    per_layer = (quantized(heads * head_dim, hidden) + 2 * quantized(kv_heads * head_dim, hidden)
                 + quantized(hidden, heads * head_dim) + 2 * quantized(inter, hidden) + quantized(hidden, inter)
                 + 2 * hidden * 2)
    expected = layers * per_layer + 2 * quantized(vocab, hidden) + hidden * 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert weights_bytes(model_source(config_path=str(path)), 2)[0] == expected
    assert 4.2 * 1024**3 < expected < 4.25 * 1024**3  # ~4.5e9 bytes: mlx-community's 4-bit checkpoint

    assert main(["plan", "--config", str(path), "--context", "32k", "--memory", "16GB"]) == 0
    assert "weights: 4.21 GB (4-bit g64" in capsys.readouterr().out
    # on a CPU device mlxkv expands the weights to float32: 8.03B parameters x 4
    assert weights_bytes(model_source(config_path=str(path)), 4)[0] == 4 * 8_030_261_248


def test_memory_md_plan_table_is_todays_output(capsys, monkeypatch):
    """MEMORY.md shows `mlxkv plan`'s output with its command: running the command prints it."""
    import shlex

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "MEMORY.md").read_text()
    block = text.split("```\n$ mlxkv plan ", 1)[1].split("```", 1)[0]
    command, _, shown = block.partition("\nmodel:")
    argv = ["plan", *shlex.split(command.replace("\\\n", " "))]
    monkeypatch.chdir(repo)
    assert main(argv) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note: MLX runs on the CPU")]
    assert printed == ("model:" + shown).rstrip("\n").splitlines()
