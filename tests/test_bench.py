"""mlxkv bench: the files it writes, the bytes it reports (against counts made from first
principles), the order it runs things in, and one-line errors for bad input. Every run is
real (the tiny model): no test feeds the runner numbers and checks its arithmetic on them."""

from __future__ import annotations

import json
import math

import pytest

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
        try:
            return main(["bench", *argv])
        except SystemExit as e:  # argparse's own one-line errors (bad counts, lists)
            return e.code

    return run


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
        for metric in ("decode_tps", "prefill_tps"):
            ratio = r[f"{metric}_vs_baseline"]
            assert (ratio is None) if base is None else (math.isfinite(ratio) and ratio > 0)
            assert math.isfinite(r[f"{metric}_vs_fp16"]) and r[f"{metric}_vs_fp16"] > 0
        assert r["fp16_config"] == "fp16"

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


def test_runs_are_interleaved_and_an_interrupt_keeps_what_finished(model):
    """Every trial visits every context and, within it, every config, starting one config
    later each trial (as the runner's docstring promises); Ctrl-C in the middle of a long run
    still makes rows of the runs that finished. Real runs on the tiny model."""
    finished = []

    def interrupt_after_14(label: str) -> None:
        finished.append(label)
        if len(finished) == 14:
            raise KeyboardInterrupt

    names = ["fp16", "q4", "mlxlm-q4"]
    rows = runner.run_bench(model, names, [16, 32], gen_tokens=1, trials=3, warmup=False, progress=interrupt_after_14)
    assert finished == [
        "fp16 @ 16", "q4 @ 16", "mlxlm-q4 @ 16", "fp16 @ 32", "q4 @ 32", "mlxlm-q4 @ 32",
        "q4 @ 16", "mlxlm-q4 @ 16", "fp16 @ 16", "q4 @ 32", "mlxlm-q4 @ 32", "fp16 @ 32",
        "mlxlm-q4 @ 16", "fp16 @ 16",  # the third trial, interrupted
    ]
    trials = {"fp16": 3, "q4": 2, "mlxlm-q4": 3}
    assert [(r["config"], r["context"], r["trials"]) for r in rows] == (
        [(c, 16, trials[c]) for c in names] + [(c, 32, 2) for c in names])
    assert all(len(r["decode_tps_trials"]) == r["trials"] and r["decode_tps"] > 0 and r["kv_bytes"] > 0 for r in rows)
    q4 = rows[1]
    assert q4["fp16_config"] == "fp16" and q4["baseline_config"] == "mlxlm-q4" and q4["decode_tps_vs_fp16"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "fp16,q7"], "unknown KV config 'q7'; known: fp16"),
        (["--contexts", "5000"], "longer than the model's maximum of 4096"),
        (["--gen-tokens", "0"], "--gen-tokens must be at least 1"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--json", "/nonexistent-dir/x.json"], "directory /nonexistent-dir does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_cli, capsys, argv, message):
    assert tiny_cli("--contexts", "32", "--gen-tokens", "1", "--trials", "1", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(("mlxkv: error: ", "mlxkv bench: error: ")) and message in err
    assert "\n" not in err and "Traceback" not in err


def test_unparsable_context_is_an_argparse_error(tiny_cli, capsys):
    assert tiny_cli("--contexts", "1024,lots") == 2
    assert "cannot read the number of tokens 'lots'" in capsys.readouterr().err


def test_context_lists_accept_k_suffix():
    from mlxkv.cli.common import token_list_arg

    assert token_list_arg("1024, 4k,8K") == [1024, 4096, 8192]


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


def test_progress_without_a_terminal_is_whole_lines(tiny_cli, capsys):
    """Under nohup or CI (stderr not a terminal) a long run still says how far it got: whole
    lines, not tqdm's carriage returns, the first at the first run and one at the end."""
    assert tiny_cli("--configs", "fp16,q8", "--contexts", "16", "--trials", "1", "--gen-tokens", "1",
                    "--no-warmup") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert lines[0].startswith("bench: 1/2 run (50%), ") and "left, fp16 @ 16" in lines[0]
    assert lines[-1].startswith("bench: 2/2 run (100%), ") and lines[-1].endswith("elapsed, q8 @ 16")
    assert len(lines) == 2
