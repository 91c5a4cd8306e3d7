"""The decode-attention bench (scripts/attention_bench.py, mlxkv.bench.attention): which row
each scheme is compared with, caches filled as a prefill fills them, and a run end to end.
No timing is asserted; speed goals live in BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from mlxkv.bench.attention import fill, measure_attention, plain_counterpart
from mlxkv.bench.runner import resolve_configs
from mlxkv.config import parse_spec


@pytest.mark.parametrize("scheme, plain", [
    ("k4v3-rot", "q4:v_bits=3"),                   # same bits however spelled; not q4, not q3
    ("q4-kivi-rot", "q4"),
    ("q4-rot", "q4"),
    ("mxfp4-rot", "mxfp4"),                        # the same format, not affine 4-bit
    ("k3v2-kivi-rot", "q3:v_bits=2:residual=0"),   # the same residual (none)
    ("q4:max_kv=256:evict=h2o:residual=32", "q4:max_kv=256"),  # the window with the same budget and tiers
    ("q4:max_kv=256:evict=h2o", "q4:max_kv=256:residual=126"),  # h2o's default recent part: half the budget
    ("q4", None),                                  # plain itself
    ("mlxlm-q4", None),
])
def test_each_scheme_is_compared_with_its_plain_storage(scheme, plain):
    candidates = resolve_configs(["q4", "q4:v_bits=3", "q3", "q3:v_bits=2", "q3:v_bits=2:residual=0", "mxfp4",
                                  "q4:max_kv=256", "q4:max_kv=256:residual=126", "q4:max_kv=512", "mlxlm-q4"])
    assert plain_counterpart(parse_spec(scheme), candidates) == plain


@pytest.mark.parametrize("spec, held", [("mlxlm-fp16", 300), ("q4", 300), ("q4-kivi-rot", 300),
                                        ("q4:max_kv=128", 128), ("q4:max_kv=128:evict=h2o", 128)])
def test_fill_leaves_the_tokens_a_prefill_would(model, spec, held):
    caches = fill(model, resolve_configs([spec])[0], 300, chunk=64)
    assert len(caches) == 2
    for cache in caches:
        size = cache.size() if hasattr(cache, "size") else cache.offset
        assert size == held


def test_measure_attention_rows_and_ratios(model):
    rows = measure_attention(model, ["mlxlm-fp16", "mlxlm-q4", "q4", "q4-rot"], contexts=[96], rounds=2, chunk=32)
    by = {r["config"]: r for r in rows}
    assert list(by) == ["mlxlm-fp16", "mlxlm-q4", "q4", "q4-rot"]
    assert all(len(r["decode_tps_trials"]) == 2 and r["ms_per_step"] > 0 for r in rows)
    assert by["q4-rot"]["plain_config"] == "q4" and by["q4"]["plain_config"] is None
    assert by["q4"]["baseline_config"] == "mlxlm-q4" and by["q4"]["decode_tps_vs_fp16"] > 0
    assert by["q4-rot"]["decode_tps_vs_plain"] > 0 and by["q4"]["decode_tps_vs_plain"] is None


def test_script_writes_json_and_markdown(tmp_path, capsys):
    script = load_script("attention_bench")
    out, md = tmp_path / "a.json", tmp_path / "a.md"
    assert script.main(["--contexts", "64", "--layers", "1", "--rounds", "1", "--configs", "q4,q4-rot",
                        "--json", str(out), "--markdown", str(md)]) == 0
    assert [r["config"] for r in json.loads(out.read_text())["rows"]] == ["q4", "q4-rot"]
    assert "| q4-rot | 64 |" in md.read_text()
    assert script.main(["--configs", "q4,zz"]) == 2
    assert "unknown KV config 'zz'" in capsys.readouterr().err
