"""Every file a command writes is checked before the model loads, and a bad one is one line
naming the flag the user gave, exit code 2; files are replaced atomically; a closed stdout
(`mlxkv plan | head -1`) ends the command quietly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlxkv
from mlxkv.cli.main import main
from mlxkv.errors import UserError

UNWRITABLE = "/proc/mlxkv-test"  # a folder that exists and takes no new file, even for root
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command loads (or reads) a model before it has checked its outputs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output paths were checked")

    import mlxkv.loading.gguf_import as gguf_import
    import mlxkv.loading.model_config as model_config

    monkeypatch.setattr(mlxkv, "load", refuse)
    monkeypatch.setattr(model_config, "model_source", refuse)
    monkeypatch.setattr(gguf_import, "import_gguf", refuse)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``mlxkv ARGV`` as the console script runs it (main, argparse's exits included): (code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# (command, flag, file name): every output flag of every command
OUTPUTS = [
    (["generate", "-p", "hi"], "--prompt-cache", "pc.safetensors"),
    (["generate", "-p", "hi"], "--memory-report", "memory.json"),
    (["generate", "-p", "hi"], "--memory-report", "memory.csv"),
    (["generate", "-p", "hi"], "--memory-plot", "memory.png"),
    (["plan"], "--json", "plan.json"),
    (["bench"], "--json", "bench.json"),
    (["bench"], "--markdown", "bench.md"),
    (["bench"], "--plot", "bench.png"),
    (["eval", "kld"], "--json", "kld.json"),
    (["eval", "kld"], "--markdown", "kld.md"),
    (["eval", "kld"], "--plot", "kld.png"),
    (["eval", "passkey"], "--json", "passkey.json"),
    (["eval", "passkey"], "--markdown", "passkey.md"),
    (["eval", "layers"], "--json", "layers.json"),
    (["eval", "layers"], "--markdown", "layers.md"),
    (["eval", "layers"], "--plot", "layers.png"),
]
ids = [f"{' '.join(c[:2])} {flag} {name}" for c, flag, name in OUTPUTS]


def _one_line(code: int, err: str, flag: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mlxkv") and re.search(rf"{flag}(?![\w-])", err), err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("command, flag, name", OUTPUTS, ids=ids)
def test_missing_directory(command, flag, name, tmp_path, nothing_loads, capsys):
    path = tmp_path / "no" / "such" / name
    code, err = run([*command, flag, str(path)], capsys)
    _one_line(code, err, flag, "does not exist")


@needs_proc
@pytest.mark.parametrize("command, flag, name", OUTPUTS, ids=ids)
def test_a_folder_that_takes_no_file(command, flag, name, nothing_loads, capsys):
    code, err = run([*command, flag, f"/proc/{name}"], capsys)
    _one_line(code, err, flag, "cannot write files in /proc")


@pytest.mark.parametrize("command, flag, name", OUTPUTS, ids=ids)
def test_a_directory_instead_of_a_file(command, flag, name, tmp_path, nothing_loads, capsys):
    code, err = run([*command, flag, str(tmp_path)], capsys)
    _one_line(code, err, flag, "is a directory")


@pytest.mark.parametrize("command, flag", [
    (["generate", "-p", "hi"], "--memory-plot"), (["bench"], "--plot"), (["eval", "kld"], "--plot"),
    (["eval", "layers"], "--plot"),
])
def test_a_plot_without_an_image_extension(command, flag, tmp_path, nothing_loads, capsys):
    pytest.importorskip("matplotlib")
    code, err = run([*command, flag, str(tmp_path / "plot.txt")], capsys)
    _one_line(code, err, flag, ".png")


@needs_proc
def test_convert_checks_its_output_directory_before_reading(tmp_path, nothing_loads, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, err = run(["convert", "--gguf", str(gguf), "--out", f"{UNWRITABLE}/model"], capsys)
    _one_line(code, err, "--out", "cannot write in /proc")
    code, err = run(["convert", "--gguf", str(gguf), "--out", str(gguf)], capsys)
    _one_line(code, err, "--out", "is not a directory")


@pytest.mark.parametrize("argv, flag, words", [
    (["generate", "-p", "hi", "--temp", "-1"], "--temp", (">= 0",)),
    (["generate", "-p", "hi", "--memory-compare", "old.json"], "--memory-compare", ("--memory-plot",)),
    (["generate", "-p", "hi", "--memory-report", "memory.txt"], "--memory-report", (".json or .csv",)),
    (["generate", "-p", "hi", "--prompt-cache", "pc.bin"], "--prompt-cache", (".safetensors",)),
    (["plan", "--memory", "8"], "--memory", ("no unit", "8GB")),
    (["plan", "--weights-bytes", "4.5"], "--weights-bytes", ("no unit",)),
    (["generate", "--kv-bits", "auto", "--memory", "8"], "--memory", ("no unit",)),
])
def test_other_bad_inputs(argv, flag, words, nothing_loads, capsys):
    code, err = run(argv, capsys)
    _one_line(code, err, flag, *words)


def test_writes_are_atomic(tmp_path):
    """A write that fails half-way leaves the file the user had, and no temporary file."""
    from mlxkv.report import write_json, write_text

    saved = tmp_path / "results.json"
    saved.write_text("keep me")
    with pytest.raises(TypeError):
        write_json(saved, [{"value": object()}], {"command": "test"})
    with pytest.raises(RuntimeError):
        from mlxkv.report import atomic_output

        with atomic_output(saved, "--json") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert saved.read_text() == "keep me"
    write_text(tmp_path / "table.md", "| a |\n")
    write_json(saved, [{"value": 1}], {"command": "test"})
    assert json.loads(saved.read_text())["rows"] == [{"value": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.md"]
    assert oct(saved.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_proc
def test_writers_name_the_option_they_are_given(tmp_path):
    from mlxkv.memory.tracker import MemoryRun, save_memory_run
    from mlxkv.report import write_text

    with pytest.raises(UserError, match="choose another --markdown path"):
        write_text(f"{UNWRITABLE}.md", "x")
    with pytest.raises(UserError, match="choose another --memory-report path"):
        save_memory_run(MemoryRun("run", []), f"{UNWRITABLE}.csv")


def _closed_stdout(*argv: str) -> subprocess.CompletedProcess:
    """The console script with a stdout whose reader is already gone (what `| head -1` leaves)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "mlxkv", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write)


@needs_proc
def test_closed_pipe_and_bad_path_through_the_real_entry_point(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
                                  "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}))
    done = _closed_stdout("plan", "--config", str(config), "--context", "4k", "--memory", "8GB")
    assert done.returncode == 1 and done.stderr == ""
    done = _closed_stdout("plan", "--config", str(config), "--json")
    assert done.returncode == 1 and done.stderr == ""
    done = subprocess.run([sys.executable, "-m", "mlxkv", "plan", "--config", str(config), "--json",
                           f"{UNWRITABLE}.json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("mlxkv: error: --json /proc/") and done.stderr.count("\n") == 1
