"""The notebook-style walkthrough runs end to end on the real model (--short) and compares like
with like: the same prompt and number of tokens, every run from the same starting memory."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest

WALKTHROUGH = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.py"


@pytest.mark.real_model
def test_walkthrough_runs(tmp_path, monkeypatch, capsys, default_gguf):
    out_dir, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(WALKTHROUGH), str(out_dir), "--short"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # its own GGUF import
    runpy.run_path(str(WALKTHROUGH), run_name="__main__")
    out = capsys.readouterr().out
    assert "recommended:" in out
    assert list(cwd.iterdir()) == []  # everything goes to the folder named on the command line

    # every run's KV bytes as the planner predicted them
    lines = [line for line in out.splitlines() if "predicted" in line and "measured" in line]
    assert len(lines) == 3
    for line in lines:
        predicted, measured = line.split("predicted ")[1].split(", measured ")
        assert predicted == measured, line

    reports = sorted(out_dir.glob("memory-*.json"))
    assert [p.name for p in reports] == ["memory-4-bit-64-token-window.json", "memory-4-bit.json", "memory-fp16.json"]
    runs = [json.loads(p.read_text()) for p in reports]
    # like with like: no run starts with an earlier run's cache still held (fp16's alone is ~12 MB here)
    starts = [run["metadata"]["start_active_bytes"] for run in runs]
    assert max(starts) - min(starts) < 1024**2, starts
    first = [run["rows"][0]["active_bytes"] - run["metadata"]["start_active_bytes"] for run in runs]
    assert all(0 <= f < 64 * 1024**2 for f in first), first
    # the same prompt and the same number of new tokens in every run
    assert len({run["rows"][-1]["tokens"] for run in runs}) == 1
    if importlib.util.find_spec("matplotlib"):
        assert (out_dir / "memory.png").is_file()
