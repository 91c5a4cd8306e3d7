"""Bad input to the loading layer: every mistake is one UserError line, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_writer import GGML_BLOCK_LAYOUT, byte_level_vocab_metadata, llama_metadata, tiny_llama_gguf, write_gguf

from mlxkv.errors import UserError
from mlxkv.loading import import_gguf, load
from mlxkv.loading.gguf_file import GGMLType
from mlxkv.loading.tiny import tiny_config


def _user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.Q8_0)[0]


def test_missing_files(tmp_path: Path, isolated_cache: Path) -> None:
    assert "no such file or directory" in _user_error(load, str(tmp_path / "absent.gguf"))
    assert "no such file or directory" in _user_error(load, "./models/absent")
    assert "no such GGUF file" in _user_error(import_gguf, tmp_path / "absent.gguf", tmp_path / "out")


@pytest.mark.parametrize("keep_bytes", [100, 2000, -10])
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


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = tiny_config("llama")
    path = write_gguf(tmp_path / "qwen.gguf", {**llama_metadata(config, arch="qwen2"), **byte_level_vocab_metadata()},
                      {"token_embd.weight": (GGMLType.F32, (4, 64), bytes(4 * 64 * 4))})
    message = _user_error(import_gguf, path, tmp_path / "out")
    assert "architecture 'qwen2' is not supported" in message and "llama" in message


@pytest.mark.parametrize("ggml_type", [GGMLType.Q6_K, GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.BF16])
def test_unsupported_tensor_type_is_named(tmp_path: Path, ggml_type: GGMLType) -> None:
    path, _ = tiny_llama_gguf(tmp_path / "tiny.gguf", GGMLType.Q8_0)
    # Rewrite one tensor as K-quant-sized garbage, and say the file is Q4_K_M, as llama.cpp would.
    elements_per_block, bytes_per_block = GGML_BLOCK_LAYOUT[ggml_type]
    shape = (64, 256)
    data = bytes(np.prod(shape) // elements_per_block * bytes_per_block)
    vocab, config = byte_level_vocab_metadata(), tiny_config("llama")
    write_gguf(path, {**llama_metadata(config), "general.file_type": 15, **vocab},
               {"blk.0.ffn_down.weight": (ggml_type, shape, data)})
    message = _user_error(import_gguf, path, tmp_path / "out")
    assert f"'blk.0.ffn_down.weight' is stored as {ggml_type.name} (a Q4_K_M file)" in message
    assert "F32, F16, Q4_0, Q4_1, Q8_0" in message


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

# Until every sub-command module exists, run the real CLI main with only `convert` registered.
_CONVERT_ONLY = (
    "import sys; from mlxkv.cli import main; main.SUBCOMMANDS = {'convert': 'convert'}; "
    "sys.exit(main.main(sys.argv[1:]))"
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mlxkv.cli.generate") is not None:
        command = [sys.executable, "-m", "mlxkv", *args]
    else:
        command = [sys.executable, "-c", _CONVERT_ONLY, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_convert_command(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    done = run_cli("convert", "--gguf", str(tiny_gguf), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}


def test_convert_refuses_a_non_empty_directory_unless_forced(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = run_cli("convert", "--gguf", str(tiny_gguf), "--out", str(out))
    assert refused.returncode != 0 and "not empty" in refused.stderr and "Traceback" not in refused.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    forced = run_cli("convert", "--gguf", str(tiny_gguf), "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").is_file()


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_convert_errors_are_one_line(tiny_gguf: Path, tmp_path: Path, case: str) -> None:
    source = tmp_path / "absent.gguf"
    if case == "truncated":
        source = tmp_path / "truncated.gguf"
        source.write_bytes(tiny_gguf.read_bytes()[:3000])
    done = run_cli("convert", "--gguf", str(source), "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("mlxkv: error: ") and done.stderr.count("\n") == 1


def test_convert_help() -> None:
    done = run_cli("convert", "--help")
    assert done.returncode == 0
    assert "--gguf FILE" in done.stdout and "--force" in done.stdout and "Q4_1" in done.stdout
