"""The notebook-style walkthrough runs end to end on the real model (short mode)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

WALKTHROUGH = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.py"


@pytest.mark.real_model
def test_walkthrough_runs(tmp_path, monkeypatch, capsys, default_gguf):
    monkeypatch.setenv("MLXKV_WALKTHROUGH_SHORT", "1")
    monkeypatch.setenv("MLXKV_WALKTHROUGH_OUT", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # its own GGUF import
    runpy.run_path(str(WALKTHROUGH), run_name="__main__")
    out = capsys.readouterr().out
    assert "recommended:" in out
    assert (tmp_path / "walkthrough_memory.json").is_file()
    # every run's KV bytes as the planner predicted them
    lines = [line for line in out.splitlines() if "predicted" in line and "measured" in line]
    assert len(lines) == 3
    for line in lines:
        predicted, measured = line.split("predicted ")[1].split(", measured ")
        assert predicted == measured, line
