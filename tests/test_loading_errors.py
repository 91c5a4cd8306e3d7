"""Bad input to the loading layer: every mistake is one UserError line (exit code 2), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf_writer import write_tiny_gguf

from mlxkv.cli.main import main
from mlxkv.errors import UserError
from mlxkv.loading import import_gguf, load


def _user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def _cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the real command line; it must exit 2 with one line on stderr."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlxkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0)[0]


def test_missing_files(tmp_path: Path, isolated_cache: Path) -> None:
    assert "no such file or directory" in _user_error(load, str(tmp_path / "absent.gguf"))
    assert "no such file or directory" in _user_error(load, "./models/absent")
    assert "no such GGUF file" in _user_error(import_gguf, tmp_path / "absent.gguf", tmp_path / "out")


@pytest.mark.parametrize("keep_bytes", [10, 100, 2000, -10])
def test_truncated_gguf(tiny_gguf: Path, tmp_path: Path, isolated_cache: Path, keep_bytes: int) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:keep_bytes])
    assert "truncated" in _user_error(load, str(truncated))
    assert not (tmp_path / "out").exists()
    assert not list(isolated_cache.rglob("*.safetensors"))  # nothing half-imported is left


def test_not_a_gguf_file(tmp_path: Path, isolated_cache: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a model, just some text\n" * 4)
    assert "is not a GGUF file" in _user_error(load, str(fake))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert "is not a GGUF file" in _user_error(load, str(notes))


@pytest.mark.parametrize(("arch", "expected"), [
    ("bert", "GGUF architecture 'bert' is not implemented by mlx-lm; mlxkv imports llama, qwen2, qwen3, gemma3"),
    ("phi3", "mlxkv does not import GGUF architecture 'phi3' yet"),
])
def test_unsupported_architecture(tmp_path: Path, capsys, arch: str, expected: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert expected in _cli_error(capsys, "convert", "--gguf", str(path), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_undecodable_tensor_type_is_named(tmp_path: Path, capsys) -> None:
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0, intermediate_size=256,
                              type_overrides={"blk.0.ffn_down.weight": Q.Q8_K},
                              metadata={"general.file_type": (15, GGUFValueType.UINT32)})
    message = _cli_error(capsys, "convert", "--gguf", str(path), "--out", str(tmp_path / "out"))
    assert "'blk.0.ffn_down.weight' is stored as Q8_K (a Q4_K_M file), which the gguf package cannot decode" in message


def test_tensor_shapes_must_match_the_metadata(tmp_path: Path) -> None:
    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2",
                              metadata={"qwen2.feed_forward_length": (96, GGUFValueType.UINT32)})
    message = _user_error(import_gguf, path, tmp_path / "out")
    assert "tensor 'blk.0.ffn_gate.weight' has shape [128, 64] where mlx-lm's qwen2 model expects [96, 64]" in message


def test_unknown_model_directories(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _user_error(load, str(empty))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    assert "cannot load the model" in _user_error(load, str(odd))


def test_unreachable_repo_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = _user_error(load, "mlxkv-tests/no-such-model")
    assert message.startswith("could not download mlxkv-tests/no-such-model")
    assert message.endswith("pass a local directory or .gguf file")


def test_bad_dtype(tiny_gguf: Path, tmp_path: Path) -> None:
    model_dir = import_gguf(tiny_gguf, tmp_path / "model")
    assert "unknown floating-point dtype" in _user_error(load, str(model_dir), dtype="int8")


# ---- the convert command ----

def test_convert_output_loads_in_plain_mlx_lm(tmp_path: Path, capsys) -> None:
    import mlx.core as mx
    import mlx_lm

    gguf_path, original = write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3")
    out = tmp_path / "converted"
    assert main(["convert", "--gguf", str(gguf_path), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    model, tokenizer = mlx_lm.load(str(out))
    ids = mx.array([tokenizer.encode("the theory of the heat")])
    np.testing.assert_allclose(np.array(model(ids)), np.array(original(ids)), atol=1e-4)


def test_convert_refuses_a_non_empty_directory_unless_forced(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert "not empty" in _cli_error(capsys, "convert", "--gguf", str(tiny_gguf), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["convert", "--gguf", str(tiny_gguf), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").is_file()


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_convert_errors_are_one_line(tiny_gguf: Path, tmp_path: Path, capsys, case: str) -> None:
    source = tmp_path / "absent.gguf"
    if case == "truncated":
        source = tmp_path / "truncated.gguf"
        source.write_bytes(tiny_gguf.read_bytes()[:3000])
    _cli_error(capsys, "convert", "--gguf", str(source), "--out", str(tmp_path / "out"))


def test_convert_help() -> None:
    done = subprocess.run([sys.executable, "-m", "mlxkv", "convert", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "--gguf FILE" in done.stdout and "--force" in done.stdout and "Q4_1" in done.stdout
    assert "gemma3" in done.stdout and "float16" in done.stdout
