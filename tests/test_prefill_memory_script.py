"""scripts/prefill_memory_bench.py end to end on the real default model at tiny contexts: it
imports (it once imported helpers cli/bench.py no longer has), reads --model, --only and
--steps, and writes rows whose transient is the peak minus the weights and the KV bytes."""

from __future__ import annotations

import json

from conftest import load_script


def test_script_runs_with_model_and_only(real_model_dir, tmp_path):
    out, md = tmp_path / "p.json", tmp_path / "p.md"
    script = load_script("prefill_memory_bench")
    code = script.main(["--model", str(real_model_dir), "--contexts", "64,128", "--configs", "q4,mlxlm-fp16",
                        "--only", "mlxlm-fp16@128", "--steps", "64", "--rounds", "1",
                        "--json", str(out), "--markdown", str(md)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["context"]) for r in rows] == [("q4", 64), ("q4", 128), ("mlxlm-fp16", 128)]
    for r in rows:
        assert r["transient_bytes"] == r["peak_bytes"] - r["weights_bytes"] - r["kv_bytes"]
    assert "| q4 | 128 |" in md.read_text()


def test_script_rejects_a_bad_only_in_one_line(capsys):
    assert load_script("prefill_memory_bench").main(["--only", "q4", "--contexts", "64"]) == 2
    assert "cannot read --only 'q4'" in capsys.readouterr().err
