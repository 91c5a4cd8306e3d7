"""Memory tracking, device memory, byte sizes, model sources and the ``mlxkv plan`` command."""

from __future__ import annotations

import builtins
import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlxkv
from mlxkv.cli.main import main
from mlxkv.errors import UserError
from mlxkv.loading.tiny import tiny_config, tiny_model
from mlxkv.memory import (
    MemoryTracker, device_memory, format_bytes, layout_from_config, load_memory_run, parse_bytes,
    plot_memory_runs,
)
from mlxkv.memory.machine_memory import _from_proc_meminfo
from mlxkv.loading.gguf_arch import config_from_gguf
from mlxkv.loading.model_config import model_source, weights_bytes
from mlxkv.stepping import forward_chunks


# -- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("8GB", 8 * 1024**3), ("8 GiB", 8 * 1024**3), ("512mb", 512 * 1024**2), ("1.5G", 1536 * 1024**2),
    ("100B", 100), ("64 KiB", 65536), ("2TB", 2 * 1024**4), (4096, 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "", "GB", "-1GB", "0", "8..5GB", "1e9", "8", "100"])
def test_parse_bytes_refuses_nonsense(text):
    with pytest.raises(UserError) as error:
        parse_bytes(text)
    assert "\n" not in str(error.value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(36 * 1024) == "36.0 KB"
    assert format_bytes(4 * 1024**3) == "4.00 GB"


# -- device memory --------------------------------------------------------------------------------
def test_device_memory_override_and_environment(monkeypatch):
    assert device_memory("16GB").recommended == 16 * 1024**3
    monkeypatch.setenv("MLXKV_MEMORY", "12GB")
    found = device_memory()
    assert found.recommended == found.total == 12 * 1024**3 and "MLXKV_MEMORY" in found.source
    assert device_memory("2GB").recommended == 2 * 1024**3  # an explicit value wins
    monkeypatch.setenv("MLXKV_MEMORY", "lots")
    with pytest.raises(UserError, match="cannot read the memory budget 'lots'"):
        device_memory()


def test_device_memory_from_proc_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:   12288000 kB\n")
    monkeypatch.setattr("mlxkv.memory.machine_memory._cgroup_limit", lambda: (None, None))
    found = _from_proc_meminfo(meminfo)
    assert (found.total, found.recommended) == (16384000 * 1024, 12288000 * 1024)
    monkeypatch.setattr("mlxkv.memory.machine_memory._cgroup_limit", lambda: (8 * 1024**3, 1024**3))
    limited = _from_proc_meminfo(meminfo)
    assert (limited.total, limited.recommended) == (8 * 1024**3, 7 * 1024**3)
    assert _from_proc_meminfo(tmp_path / "missing") is None


def test_device_memory_on_this_machine(monkeypatch):
    monkeypatch.delenv("MLXKV_MEMORY", raising=False)
    found = device_memory()
    assert 0 < found.recommended <= found.total


# -- tracking ------------------------------------------------------------------------------------
def tracked_run(config, label, tokens=96, chunk=16):
    model = tiny_model("llama", head_dim=64)
    cache = mlxkv.make_kv_cache(model, config)
    with MemoryTracker(cache, label=label, model=model, kv_config=config) as tracker:
        for _ in forward_chunks(model, mx.zeros((tokens,), dtype=mx.int32), cache, chunk):
            tracker.step()
    return tracker, cache


def test_tracker_records_each_step():
    tracker, cache = tracked_run("q4", "q4")
    records = tracker.records
    assert [r["tokens"] for r in records] == list(range(16, 97, 16))
    last = records[-1]
    assert last["kv_bytes_per_layer"] == [c.nbytes for c in cache]
    assert last["kv_bytes"] == sum(c.nbytes for c in cache)
    assert all(r["peak_bytes"] >= r["active_bytes"] > 0 for r in records)
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(records, records[1:]))
    assert tracker.run.info["weights_bytes"] > 0
    assert "q4: KV cache" in tracker.summary()


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_tracker_reports_round_trip(tmp_path, suffix):
    tracker, _ = tracked_run("fp16", "fp16")
    path = tmp_path / f"memory{suffix}"
    tracker.save(path)
    back = load_memory_run(path)
    assert [r["tokens"] for r in back.records] == [r["tokens"] for r in tracker.records]
    assert [r["kv_bytes_per_layer"] for r in back.records] == [r["kv_bytes_per_layer"] for r in tracker.records]
    assert [int(r["peak_bytes"]) for r in back.records] == [r["peak_bytes"] for r in tracker.records]
    if suffix == ".json":
        assert back.label == "fp16"
        assert json.loads(path.read_text())["metadata"]["machine"]


def test_tracker_refuses_unknown_formats(tmp_path):
    tracker, _ = tracked_run("fp16", "fp16", tokens=16)
    with pytest.raises(UserError, match=r"\.json or \.csv"):
        tracker.save(tmp_path / "memory.txt")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a memory report"):
        load_memory_run(tmp_path / "junk.json")


def test_plot_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [tracked_run(config, label)[0].run for config, label in (("fp16", "fp16"), ("q4", "4-bit"))]
    path = plot_memory_runs(runs, tmp_path / "memory.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_one_line_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    run = tracked_run("fp16", "fp16", tokens=16)[0].run
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r"pip install 'mlxkv\[plot\]'"):
        plot_memory_runs([run], tmp_path / "memory.png")


# -- model sources ------------------------------------------------------------------------------
def test_gguf_source_reads_the_header_only(default_gguf):
    source = model_source(str(default_gguf))
    # SmolLM2-135M: 30 layers, 9 query heads over 3 KV heads of 64, 576 wide, tied embeddings
    assert {k: source.config[k] for k in ("model_type", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "hidden_size", "tie_word_embeddings")} == {
        "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "tie_word_embeddings": True}
    assert source.stored_bytes <= default_gguf.stat().st_size
    assert weights_bytes(source, 4)[0] == source.parameters * 4
    assert model_source(None).name == str(default_gguf)


def test_gguf_config_for_a_sliding_window_architecture():
    meta = {"general.architecture": "gemma3", "gemma3.block_count": 12, "gemma3.embedding_length": 640,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.attention.sliding_window": 512, "gemma3.feed_forward_length": 2048,
            "gemma3.context_length": 32768}
    config = config_from_gguf(meta, ["token_embd.weight"], {"token_embd.weight": (262144, 640)})
    layout = layout_from_config(config)
    # mlx-lm's gemma3_text: every 6th layer global, the others a 512-token window
    assert [s.window for s in layout.layers] == [512] * 5 + [None] + [512] * 5 + [None]
    assert {(s.kv_heads, s.key_dim) for s in layout.layers} == {(1, 256)}


def test_directory_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("qwen3")))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 12345}}))
    source = model_source(str(tmp_path))
    assert source.kind == "directory" and source.stored_bytes == 12345
    assert weights_bytes(source, 2) == (12345, "as stored")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        model_source(str(empty))


def test_hub_source_downloads_config_only(tmp_path, monkeypatch):
    import huggingface_hub

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config("llama")))
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append(filename)
        return str(config_file)

    def no_metadata(repo_id, **kwargs):
        raise huggingface_hub.errors.NotASafetensorsRepoError("no safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", no_metadata)
    source = model_source("org/tiny-llama")
    assert asked == ["config.json"] and source.kind == "hub" and source.stored_bytes is None
    estimate, how = weights_bytes(source, 2)  # parameters x 2 bytes, counted on the real model
    assert estimate == 2 * sum(v.size for _, v in tree_flatten(tiny_model("llama").parameters()))
    assert "parameters" in how


def test_hub_errors_are_one_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub") as error:
        model_source("org/some-model")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="no such file"):
        model_source("./missing/model.gguf")


# -- the command ----------------------------------------------------------------------------------
def test_plan_command_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_config("gemma3_text", head_dim=64), "max_position_embeddings": 4096}))
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(config), "--context", "2k", "--memory", "256MB",
                 "--baselines", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {r["config"]: r for r in payload["rows"]}
    assert set(rows) >= {"fp16", "q8", "q4", "k8v4", "mlxlm-fp16", "mlxlm-q4"}
    for row in rows.values():
        assert {"config", "kv_bytes_per_token", "kv_bytes", "weights_bytes", "total_bytes", "max_context",
                "fits"} <= set(row)
        assert row["total_bytes"] == row["kv_bytes"] + row["weights_bytes"]
        assert row["peak_bytes"] == row["total_bytes"] + row["prefill_bytes"] and row["fits"]  # nothing to load
    assert payload["metadata"]["context"] == 2048 and payload["metadata"]["prefill_step_size"] == 2048
    assert payload["metadata"]["recommended"]["config"] == "fp16"

    assert main(["plan", "--config", str(config), "--context", "1000", "--memory", "1GB"]) == 0
    text = capsys.readouterr().out
    assert "recommended: fp16" in text and "bytes/token" in text and "sliding window" in text


@pytest.mark.parametrize("argv, message", [
    (["plan", "--memory", "8 parsecs"], "argument --memory: cannot read the size '8 parsecs'"),
    (["plan", "--memory", "8"], "argument --memory: the size '8' has no unit"),
    (["plan", "--model", "./nope.gguf"], "no such file or directory"),
    (["plan", "--config", "CONFIG", "--context", "100"], "lacks num_hidden_layers"),
    (["plan", "--weights-bytes", "heavy"], "argument --weights-bytes: cannot read the size 'heavy'"),
    (["plan", "--kv-configs", "q4,q9"], "unknown KV config 'q9'"),
])
def test_plan_command_bad_input(tmp_path, capsys, argv, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama"}))
    try:
        code = main([str(config) if a == "CONFIG" else a for a in argv])
    except SystemExit as e:  # argparse's own one-line errors (bad sizes)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith(("mlxkv: error:", "mlxkv plan: error:"))
