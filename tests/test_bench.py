"""mlxkv bench: the files it writes, the bytes it reports (against counts made from first
principles), the order it runs things in, and one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest

from mlxkv.memory.tracker import model_weights_bytes

import mlxkv
from mlxkv.bench import runner
from mlxkv.cli.main import main
from mlxkv.config import DEFAULT_RESIDUAL

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64  # the tiny llama of conftest.py's `model` fixture
STEP = 256  # mlx-lm's and our caches grow in steps of 256 tokens


@pytest.fixture
def tiny_cli(model, monkeypatch):
    """``mlxkv bench`` on the tiny model: ``mlxkv.load`` hands it over whatever --model says."""
    monkeypatch.setattr(mlxkv, "load", lambda name=None, **kw: (model, None))

    def run(*argv: str) -> int:
        return main(["bench", *argv])

    return run


def paired(row: dict, ref: dict, metric: str) -> float:
    """Median over trials of this trial's value / the reference's value in the same trial."""
    a, b = row[f"{metric}_trials"], ref[f"{metric}_trials"]
    ratios = sorted(x / y for x, y in zip(a, b))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def steps(tokens: int) -> int:
    return -(-tokens // STEP) * STEP


def test_outputs_are_well_formed(tiny_cli, tmp_path, capsys):
    paths = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "md", "png")}
    configs = ["fp16", "q4", "k8v4", "mlxlm-fp16", "mlxlm-q8", "mlxlm-q4"]
    code = tiny_cli(
        "--contexts", "64,300", "--configs", ",".join(configs), "--gen-tokens", "3", "--trials", "2",
        "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"]),
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "synthetic" in table and all(c in table for c in configs)

    payload = json.loads(paths["json"].read_text())
    machine = payload["metadata"]["machine"]
    for key in ("machine", "chip", "os", "mlx", "mlx_lm"):
        assert machine[key]
    assert "synthetic" in payload["metadata"]["prompt"]
    rows = payload["rows"]
    assert [(r["config"], r["context"]) for r in rows] == [(c, n) for n in (64, 300) for c in configs]
    for r in rows:
        for key in ("prefill_tps", "decode_tps", "peak_memory_bytes", "kv_bytes"):
            assert r[key] > 0, (r["config"], key)
        assert r["prefill_tps_min"] <= r["prefill_tps"] <= r["prefill_tps_max"]
        assert r["decode_tps_min"] <= r["decode_tps"] <= r["decode_tps_max"]
        assert len(r["decode_tps_trials"]) == 2
        assert r["peak_memory_bytes"] >= r["weights_bytes"] + r["kv_bytes"]

    by = {(r["config"], r["context"]): r for r in rows}
    expected_baseline = {"fp16": "mlxlm-fp16", "q4": "mlxlm-q4", "k8v4": "mlxlm-q8"}
    for (config, n), r in by.items():
        base = expected_baseline.get(config)
        assert r["baseline_config"] == base
        if base is None:
            assert r["decode_tps_vs_baseline"] is None
        else:
            assert math.isclose(r["decode_tps_vs_baseline"], paired(r, by[(base, n)], "decode_tps"))
            assert math.isclose(r["prefill_tps_vs_baseline"], paired(r, by[(base, n)], "prefill_tps"))
        assert r["fp16_config"] == "fp16"
        assert math.isclose(r["decode_tps_vs_fp16"], paired(r, by[("fp16", n)], "decode_tps"))

    markdown = paths["md"].read_text()
    assert markdown.startswith("# mlxkv bench")
    assert "| config |" in markdown and markdown.count("| mlxlm-q4 |") == 2
    assert "mlx-lm" in markdown and "Command:" in markdown

    plt = pytest.importorskip("matplotlib.pyplot")
    image = plt.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300


def test_kv_bytes_match_counts_from_first_principles(model):
    """fp16 yardstick: 2 bytes per element of the tokens held. Allocated: whole steps of 256
    tokens. mlx-lm's KVCache holds float32 (the tiny model's dtype); ours at 4 bits g64
    packs the flushed tokens at 4 bits + a 16-bit scale and bias per 64 elements and keeps
    the newest 32 and the first 4 (attention sinks) in 16 bits; mlx-lm's 4-bit cache keeps
    scales and biases in float32."""
    context, gen = 300, 5
    configs = ["fp16", "q4", "mlxlm-fp16", "mlxlm-q4"]
    by = {r["config"]: r for r in runner.run_bench(model, configs, [context], gen, trials=1, warmup=False)}
    tokens = context + gen
    sinks = 4
    packed = tokens - DEFAULT_RESIDUAL - sinks
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM  # elements: layers x (K, V) x heads x dim
    ours_bits, mlx_lm_bits = 4 + 2 * 16 / 64, 4 + 2 * 32 / 64

    for config in configs:
        assert by[config]["kv_fp16_bytes"] == per_token * tokens * 2
    for config in ("fp16", "mlxlm-fp16"):
        assert by[config]["kv_bytes"] == per_token * steps(tokens) * 4
        assert by[config]["kv_bits_per_element"] == 32
    assert by["q4"]["kv_bytes"] == per_token * (steps(packed) * ours_bits / 8 + (DEFAULT_RESIDUAL + sinks) * 2)
    ours_filled = per_token * (packed * ours_bits / 8 + (DEFAULT_RESIDUAL + sinks) * 2)
    assert by["q4"]["kv_filled_bytes"] == ours_filled
    assert by["q4"]["kv_bits_per_element"] == pytest.approx(8 * ours_filled / (per_token * tokens))
    assert by["q4"]["kv_vs_fp16"] == pytest.approx(ours_filled / (per_token * tokens * 2))
    assert by["mlxlm-q4"]["kv_bytes"] == per_token * steps(tokens) * mlx_lm_bits / 8
    assert by["mlxlm-q4"]["kv_bits_per_element"] == pytest.approx(mlx_lm_bits)


def test_runs_are_interleaved_and_summarized(model, monkeypatch):
    """Every trial visits every config at every context, starting one config later each
    trial; rows hold the median and spread of what the runs measured."""
    calls = []
    decode_seconds = iter([1.0, 2.0, 4.0] * 10)

    def fake_measure(model, spec, prompt, gen_tokens, chunk_size):
        calls.append((spec.label, prompt.size))
        kv = 1000 if spec.config.quantized else 4000
        return {
            "prefill_s": 0.5, "decode_s": next(decode_seconds), "peak_memory_bytes": 10_000,
            "prefill_peak_memory_bytes": 10_000, "decode_peak_memory_bytes": 9_000,
            "kv_bytes": kv + 24, "kv_filled_bytes": kv, "kv_fp16_bytes": 2000,
        }

    monkeypatch.setattr(runner, "measure", fake_measure)
    names = ["fp16", "q4", "mlxlm-q4"]
    rows = runner.run_bench(model, names, [16, 32], gen_tokens=8, trials=3, warmup=False)

    expected = []
    for trial in range(3):
        rotated = names[trial:] + names[:trial]
        expected += [(label, n) for n in (16, 32) for label in rotated]
    assert calls == expected

    q4 = next(r for r in rows if r["config"] == "q4" and r["context"] == 16)
    # per trial, q4 took 2, 1, 4 s and fp16 1, 4, 2 s: ratios 0.5, 4, 0.5 -> median 0.5
    assert q4["decode_tps_vs_fp16"] == 0.5
    assert q4["prefill_tps"] == 32  # 16 tokens / 0.5 s
    assert sorted(q4["decode_tps_trials"]) == [2.0, 4.0, 8.0]  # 8 tokens / 4, 2, 1 s
    assert (q4["decode_tps"], q4["decode_tps_min"], q4["decode_tps_max"]) == (4.0, 2.0, 8.0)
    assert q4["kv_vs_fp16"] == 0.5 and q4["kv_bits_per_element"] == 8.0
    weights = model_weights_bytes(model)
    assert q4["decode_overhead_bytes"] == 9_000 - weights - 1024


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "fp16,q7"], "unknown KV config 'q7'; known: fp16"),
        (["--contexts", "5000"], "longer than the model's maximum of 4096"),
        (["--contexts", "0"], "context 0 is not a positive number"),
        (["--gen-tokens", "0"], "--gen-tokens must be at least 1"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--json", "/nonexistent-dir/x.json"], "directory /nonexistent-dir does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_cli, capsys, argv, message):
    assert tiny_cli("--contexts", "32", "--gen-tokens", "1", "--trials", "1", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlxkv: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unparsable_context_is_an_argparse_error(tiny_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tiny_cli("--contexts", "1024,lots")
    assert exit_info.value.code == 2
    assert "'lots' is not a number of tokens" in capsys.readouterr().err


def test_context_lists_accept_k_suffix():
    from mlxkv.cli.bench import _int_list

    assert _int_list("1024, 4k,8K") == [1024, 4096, 8192]


@pytest.mark.real_model
def test_real_model_short_run():
    model, _ = mlxkv.load()
    rows = runner.run_bench(model, ["q4", "mlxlm-q4"], [64], gen_tokens=2, trials=1, warmup=False)
    assert [r["config"] for r in rows] == ["q4", "mlxlm-q4"]
    assert all(r["decode_tps"] > 0 and r["kv_bytes"] > 0 for r in rows)
    assert rows[0]["kv_fp16_bytes"] == 30 * 2 * 3 * 64 * 66 * 2  # SmolLM2-135M: 30 layers, 3 KV heads


def test_baselines_follow_bits_and_group_size():
    specs = runner.resolve_configs(["q4:group_size=32", "k8v4", "fp16", "q6", "mlxlm-q4:group_size=32",
                                    "mlxlm-q4", "mlxlm-q8", "mlxlm-fp16"])
    by = {s.label: s for s in specs}
    assert runner.baseline_for(by["q4:group_size=32"].config, specs) == "mlxlm-q4:group_size=32"
    assert runner.baseline_for(by["k8v4"].config, specs) == "mlxlm-q8"
    assert runner.baseline_for(by["fp16"].config, specs) == "mlxlm-fp16"
    assert runner.baseline_for(by["q6"].config, specs) is None  # no 6-bit mlx-lm row measured
    assert runner.baseline_for(by["mlxlm-q4"].config, specs) is None
    assert runner.fp16_reference(specs) == "fp16"
    assert runner.fp16_reference(specs[4:]) == "mlxlm-fp16"


def test_an_interrupted_run_reports_what_finished(model, monkeypatch):
    """Ctrl-C in the middle of a long run: the finished runs still make rows."""
    runs = []

    def measure_then_interrupt(model, spec, prompt, gen_tokens, chunk_size):
        if len(runs) == 3:
            raise KeyboardInterrupt
        runs.append(spec.label)
        return {"prefill_s": 1.0, "decode_s": 1.0, "peak_memory_bytes": 1, "prefill_peak_memory_bytes": 1,
                "decode_peak_memory_bytes": 1, "kv_bytes": 1, "kv_filled_bytes": 1, "kv_fp16_bytes": 1}

    monkeypatch.setattr(runner, "measure", measure_then_interrupt)
    rows = runner.run_bench(model, ["fp16", "q4"], [16, 32], gen_tokens=1, trials=2, warmup=False)
    assert [(r["config"], r["context"], r["trials"]) for r in rows] == [("fp16", 16, 1), ("q4", 16, 1), ("fp16", 32, 1)]
    assert rows[2]["decode_tps_vs_fp16"] == 1.0 and rows[2]["baseline_config"] is None
