"""mlxkv eval on the command line: the files it writes, the rows they hold, and one-line
errors for bad input (raised before any model is loaded)."""

from __future__ import annotations

import json

import pytest

import mlxkv
from conftest import ByteTokenizer
from mlxkv.cli.eval import passkey_table_rows
from mlxkv.cli.main import main
from mlxkv.config import parse_spec
from mlxkv.errors import UserError
from mlxkv.eval.corpus import bundled_corpus, corpus_tokens
from mlxkv.loading.tiny import tiny_model


@pytest.fixture
def tiny_cli(monkeypatch):
    model = tiny_model("llama", head_dim=64)
    monkeypatch.setattr(mlxkv, "load", lambda name=None, **kw: (model, ByteTokenizer()))

    def run(*argv: str) -> int:
        return main(["eval", *argv])

    return run


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model before rejecting its input."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(mlxkv, "load", load)


def test_kld_writes_json_markdown_and_plot(tiny_cli, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "kld.json"
    md, png = tmp_path / "kld.md", tmp_path / "kld.png"
    assert tiny_cli("kld", "--tokens", "40", "--chunk", "8", "--configs", "fp16,q4:residual=16,mlxlm-q4",
                    "--json", str(out), "--markdown", str(md), "--plot", str(png)) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["config"] for r in rows] == ["fp16", "q4:residual=16", "mlxlm-q4"]
    for row in rows:
        assert {"config", "kld", "ppl", "ppl_ref", "top1", "bits_per_element"} <= set(row)
    assert rows[0]["kld"] == 0.0
    assert data["metadata"]["corpus"].startswith("Alice's Adventures in Wonderland")
    assert data["metadata"]["machine"]["mlx"]
    assert "| q4:residual=16 |" in md.read_text()
    assert png.stat().st_size > 0
    shown = capsys.readouterr().out
    assert "Alice's Adventures in Wonderland" in shown and "first 40 tokens" in shown


def test_kld_reads_a_user_text(tiny_cli, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Hello there, this is a short text of more than twenty bytes.")
    assert tiny_cli("kld", "--text", str(text), "--tokens", "20", "--configs", "q8") == 0
    assert "t.txt, first 20 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["kld", "--configs", "q4,zz"], "unknown KV config 'zz'"),
    (["kld", "--configs", "q4:residual"], "write FIELD=VALUE"),
    (["kld", "--configs", "q4:foo=1"], "unknown KV config field 'foo'"),
    (["kld", "--reference", "q4"], "is quantized"),
    (["kld", "--text", "/nonexistent/t.txt"], "no such text file"),
    (["kld", "--chunk", "0"], "--chunk must be at least 1"),
    (["kld", "--tokens", "1"], "--tokens must be at least 2"),
    (["kld", "--json", "/nonexistent/dir/k.json"], "does not exist"),
    (["passkey", "--depths", "0,1.5"], "outside 0..1"),
    (["passkey", "--trials", "0"], "--trials must be at least 1"),
    (["passkey", "--markdown", "/nonexistent/dir/p.md"], "does not exist"),
    (["layers", "--base", "mlxlm-q4"], "cannot take per-layer bits"),
    (["layers", "--base", "mxfp4"], "cannot take per-layer bits"),
    (["layers", "--base", "q4", "--high-bits", "3"], "is not above the base's 4 bits"),
    (["layers", "--high-bits", "7"], "--high-bits 7 is not supported"),
    (["layers", "--base", "q3", "--budget", "3"], "below 3-bit's 3.50"),
    (["layers", "--plot", "/nonexistent/dir/l.png"], "does not exist"),
])
def test_bad_input_is_one_line_before_loading(no_model, capsys, argv, message):
    try:
        code = main(["eval", *argv])
    except SystemExit as e:  # argparse's own one-line errors (bad counts)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(("mlxkv: error: ", "mlxkv eval ")) and message in err
    assert err.count("\n") == 1


def test_unreadable_lists_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "passkey", "--lengths", "512,abc"])
    assert e.value.code == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "layers", "--check-tokens", "-1"])
    assert e.value.code == 2 and "--check-tokens" in capsys.readouterr().err


def test_too_many_tokens_for_the_text(tiny_cli, capsys):
    assert tiny_cli("kld", "--tokens", "10000000") == 2
    assert "lower --tokens" in capsys.readouterr().err


def test_bundled_corpus_is_long_english_prose():
    corpus = bundled_corpus()
    words = corpus.text.split()
    assert len(words) > 25_000
    assert corpus.text.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "\r" not in corpus.text
    assert len(corpus_tokens(ByteTokenizer(), corpus, 5000)) == 5000
    with pytest.raises(UserError):
        corpus_tokens(ByteTokenizer(), corpus, 1)


def test_parse_spec_overrides_named_configs():
    assert parse_spec("q4:residual=64") == parse_spec("q4").replace(residual=64)
    assert parse_spec("k8v4:group_size=32:residual=0").group_size == 32
    assert parse_spec("fp16:max_kv=64").max_kv == 64
    assert parse_spec("q4:max_kv=none").max_kv is None
    assert parse_spec("q4:residual=none").effective_residual == 32  # none: the default
    with pytest.raises(UserError, match="cannot read the sinks 'none'"):
        parse_spec("q4:sinks=none")
    with pytest.raises(UserError, match="cannot read the residual 'x'"):
        parse_spec("q4:residual=x")


def test_passkey_table_puts_the_reference_first():
    rows = [
        {"config": c, "length": 256, "depth": d, "accuracy": a, "accuracy_ref": r, "reference": "mlxlm-fp16"}
        for c, d, a, r in [("q4", 0.0, 1.0, 1.0), ("q4", 1.0, 0.0, 0.5), ("q8", 0.0, 1.0, 1.0), ("q8", 1.0, 0.5, 0.5)]
    ]
    table, columns, headers = passkey_table_rows(rows)
    assert columns == ["config", "length", "d0", "d1", "mean"]
    assert [t["config"] for t in table] == ["mlxlm-fp16 (reference)", "q4", "q8"]
    assert table[0]["d1"] == 0.5 and table[0]["mean"] == 0.75
    assert table[1]["mean"] == 0.5 and table[2]["mean"] == 0.75


def test_config_the_model_cannot_hold_fails_before_running(monkeypatch, capsys):
    model = tiny_model("llama")  # head_dim 16: no supported group size divides it
    monkeypatch.setattr(mlxkv, "load", lambda name=None, **kw: (model, ByteTokenizer()))
    assert main(["eval", "kld", "--tokens", "20", "--configs", "fp16,q4"]) == 2
    assert "does not divide the model's head_dim 16" in capsys.readouterr().err


def test_kld_contexts_scores_windows_and_plots_against_length(tiny_cli, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "long.json", tmp_path / "long.png"
    assert tiny_cli("kld", "--contexts", "40,80", "--window", "8", "--chunk", "4", "--prefill-chunk", "16",
                    "--configs", "fp16,q4", "--json", str(out), "--plot", str(png)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["context"], r["config"]) for r in rows] == [(40, "fp16"), (40, "q4"), (80, "fp16"), (80, "q4")]
    assert all(r["positions"] == 8 for r in rows)
    assert png.stat().st_size > 0


def test_kld_contexts_with_overlapping_windows_is_one_line(no_model, capsys):
    assert main(["eval", "kld", "--contexts", "40,44", "--window", "8"]) == 2
    err = capsys.readouterr().err
    assert "window" in err and "Traceback" not in err
