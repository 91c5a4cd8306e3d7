"""Per-layer calibration: measured sensitivity and where the bit budget goes."""

import importlib.util
import json

import mlx.core as mx
import pytest

import mlxkv
from conftest import ByteTokenizer
from mlxkv.cli.main import main
from mlxkv.eval.layers import allocate_bits, calibrated_config, end_layers, format_layer_bits, layer_sensitivity
from mlxkv.loading.tiny import tiny_model


def test_a_layer_whose_attention_output_is_zero_is_not_sensitive():
    model = tiny_model("llama", head_dim=64, num_hidden_layers=4)
    attn = model.model.layers[1].self_attn
    attn.o_proj.weight = mx.zeros_like(attn.o_proj.weight)  # layer 1's cache cannot matter
    tokens = mx.random.randint(0, 256, (80,), key=mx.random.key(3))
    rows = layer_sensitivity(model, tokens, mlxkv.KVConfig(bits=2, residual=0))
    kld = [r["kld"] for r in rows]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert kld[1] < 1e-9 and min(kld[0], kld[2], kld[3]) > 1e-5
    config, rows = calibrated_config(model, tokens, mlxkv.KVConfig(bits=2, residual=0), 8, 4.0)
    upgraded = [layer for layer, _ in config.layer_bits]
    assert len(upgraded) == 1 and upgraded[0] == max(range(4), key=lambda i: kld[i])
    assert [r["bits"] for r in rows].count(8) == 1


def test_budget_goes_to_the_most_sensitive_layers():
    sensitivity = [0.1, 0.5, 0.01, 0.3, 0.2, 0.05]
    # 2-bit g64 = 2.5 bits, 8-bit g64 = 8.5 bits: a 4.5-bit mean affords 2 of 6 layers at 8-bit
    assert allocate_bits(sensitivity, 2, 8, 4.5) == ((1, 8), (3, 8))
    assert allocate_bits(sensitivity, 2, 8, 2.5) == ()
    assert len(allocate_bits(sensitivity, 2, 8, 9.0)) == 6
    assert format_layer_bits(((1, 8), (3, 8))) == "1:8,3:8"
    with pytest.raises(mlxkv.UserError, match="below 2-bit"):
        allocate_bits(sensitivity, 2, 8, 2.0)


def test_end_layers_alternate_from_both_ends():
    assert end_layers(3, 30, 8) == ((0, 8), (1, 8), (29, 8))
    assert end_layers(9, 4, 6) == ((0, 6), (1, 6), (2, 6), (3, 6))
    assert end_layers(0, 4, 8) == ()


def test_eval_layers_cli_raises_the_most_sensitive_layers(monkeypatch, tmp_path, capsys):
    """Layer 2's attention output is zeroed, so its cache cannot matter: the calibration must
    measure it as insensitive, spend the budget elsewhere, and the held-out check must show
    the calibrated map beating the base config alone."""
    model = tiny_model("llama", head_dim=64, num_hidden_layers=4)
    attn = model.model.layers[2].self_attn
    attn.o_proj.weight = mx.zeros_like(attn.o_proj.weight)

    monkeypatch.setattr(mlxkv, "load", lambda name=None, **kw: (model, ByteTokenizer()))
    out = tmp_path / "layers.json"
    # 2-bit g64 = 2.5, 8-bit g64 = 8.5 bits: a 4.0 budget raises 1 of 4 layers
    argv = ["eval", "layers", "--base", "q2:residual=0", "--budget", "4.0", "--tokens", "64",
            "--check-tokens", "64", "--json", str(out)]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--plot", str(tmp_path / "layers.png")]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = {r["layer"]: r for r in data["rows"]}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[2]["kld"] < 1e-9 and rows[2]["bits"] == 2
    raised = [layer for layer, r in rows.items() if r["bits"] == 8]
    assert raised == [max(rows, key=lambda i: rows[i]["kld"])]
    assert data["metadata"]["kv_bits_map"] == f"{raised[0]}:8"
    check = {r["config"]: r for r in data["metadata"]["check"]}
    assert check["q2:residual=0 + calibrated map"]["kld"] < check["q2:residual=0"]["kld"]
    assert f"--kv-bits-map {raised[0]}:8" in capsys.readouterr().out
