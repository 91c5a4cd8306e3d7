"""Sharded generation under ``mlx.launch --backend ring -n 3 --hosts 127.0.0.1``, against one process.

The reference is the same model and KV config run whole in this (pytest) process: greedy
tokens must be identical and the log-probabilities equal up to float32 noise (KL divergence and
the largest gap; the ring sums each layer's three partial products in another order than one
matmul does), while the gap between KV configs is far larger; each rank's KV bytes must be a
third of one process's. Ranks run this file as a script (``rank`` mode below) so
they and the reference share the loop; the sharding is the library's (``mlxkv.distributed``).

Loopback on a shared 2-core machine makes every ``all_sum`` slow (tens of ms: three ranks' spinning
socket threads on two cores) and each start slow (three processes import and load), so runs are
short: few forward passes over two layers (the tiny model; the default model cut to its first two,
with its own weights, heads, MLP and tokenizer). ``python tests/test_distributed.py measure``
compares the whole default model, config by config (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

RANKS = 3
# SmolLM2's 3 KV heads, an MLP that splits in 3; untied output weights give varied greedy tokens
TINY = {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 192,
        "tie_word_embeddings": False}
CONFIGS = ("fp16", "q8", "q4-kivi-rot", "q4:max_kv=48:evict=h2o")  # q4-kivi-rot is what --kv-bits 4 picks
EXACT = CONFIGS[:3]  # H2O scores a rank's own heads only: measured, not asserted identical
KLD_NOISE = 1e-5  # nats per position: float32 reordering measures ~5e-7 (an estimate that noise dominates)
GAP_NOISE = 5e-4  # largest |log p| gap on plausible tokens: reordering measures <= 8e-5 on two layers (a
# value a rounding away from a quantization boundary can flip a level; 1.3e-3 over all 30 of the default
# model's); q8 against fp16 is 5e-3 to 1e-2, q4 against fp16 8e-2 to 2.6
LAUNCH_TIMEOUT = 240
REAL_LAYERS = 2  # of the default model's 30: each layer costs two all_sums per forward pass


# -- what every rank (and the reference) runs -------------------------------------------------
def tiny_prompt() -> list[int]:
    # past the 4 sinks, the 32 recent tokens and a 64-token group of per-channel keys: some are packed
    return mx.random.randint(0, 256, (120,), key=mx.random.key(7)).tolist()


def run_config(model, spec: str, prompt: list[int], steps: int, chunk: int) -> dict:
    """Prefill ``prompt`` in chunks, then ``steps`` greedy tokens: tokens, log-probs, KV bytes."""
    from mlxkv.caches.factory import make_kv_cache
    from mlxkv.config.spec import parse_spec
    from mlxkv.memory.held import layer_kv_bytes
    from mlxkv.stepping import prefill

    cache = make_kv_cache(model, parse_spec(spec))
    logits = prefill(model, prompt, cache, chunk)
    tokens, log_probs = [], []
    for step in range(steps):
        lp = (logits - mx.logsumexp(logits, keepdims=True)).astype(mx.float32)
        token = int(mx.argmax(lp).item())
        tokens.append(token)
        log_probs.append(lp)
        if step + 1 < steps:
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
    mx.eval([c.state for c in cache])
    return {"tokens": tokens, "log_probs": mx.stack(log_probs), "kv_bytes": sum(layer_kv_bytes(cache))}


def real_prompt(tokenizer) -> list[int]:
    text = ("The history of Paris begins with a Celtic tribe, the Parisii, who settled on an island in the "
            "Seine around 250 BC. The Romans conquered the area in 52 BC and built a town called Lutetia. "
            "In the following centuries the city grew along the river: the kings built the Louvre as a "
            "fortress, the bishops the cathedral of Notre-Dame, and the scholars of Europe came to the "
            "university on the left bank. By the end of the Middle Ages Paris was the largest city of")
    return list(tokenizer.encode(text))


TINY_JOB = {"model": "tiny", "configs": CONFIGS, "steps": 8, "chunk": 48}


def real_job(model_dir: str, configs=EXACT, layers: int | None = None, steps: int = 2) -> dict:
    """The default model (or its first ``layers`` layers); by default the prompt but its last token
    in one pass (packed past the sinks and recent tokens), then its last token and one more read
    the packed cache: three passes per config."""
    return {"model": model_dir, "layers": layers, "configs": configs, "steps": steps, "chunk": 2048}


@pytest.fixture(scope="module")
def cut_model_dir(real_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's first REAL_LAYERS layers as a model directory: its weights, heads, MLP and
    tokenizer, loaded in a fraction of the time by each rank."""
    import shutil

    cut = tmp_path_factory.mktemp("smollm2-cut")
    weights = mx.load(str(real_model_dir / "model.safetensors"))
    keep = {k: v for k, v in weights.items()
            if not (m := re.search(r"\.layers\.(\d+)\.", k)) or int(m.group(1)) < REAL_LAYERS}
    mx.save_safetensors(str(cut / "model.safetensors"), keep, metadata={"format": "mlx"})
    config = json.loads((real_model_dir / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**config, "num_hidden_layers": REAL_LAYERS}))
    for file in real_model_dir.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            shutil.copy(file, cut / file.name)
    return cut


def load_job_model(job: dict, shard: bool = False):
    """(model, prompt) for a job, split over the launched group when ``shard``."""
    import mlxkv
    from mlxkv import distributed
    from mlxkv.loading.tiny import tiny_model

    if job["model"] == "tiny":
        model, prompt = tiny_model(job.get("arch", "llama"), **job.get("shape", TINY)), tiny_prompt()
    else:
        model, tokenizer = mlxkv.load(job["model"])
        if job.get("layers"):
            model.model.layers = model.model.layers[:job["layers"]]
        prompt = real_prompt(tokenizer)
    if shard:
        distributed.shard(model, distributed.start(), pipeline=job.get("pipeline", False))
    return model, prompt


def run_job(model, prompt: list[int], job: dict) -> dict[str, dict]:
    return {spec: run_config(model, spec, prompt, job["steps"], job["chunk"]) for spec in job["configs"]}


def layer_shapes(layout) -> list[list[int | None]]:
    return [[layer.kv_heads, layer.key_dim, layer.value_dim, layer.window, layer.keep] for layer in layout.layers]


def rank_main(job: str, out: str) -> None:
    """One rank: shard with mlxkv.distributed, run every config, write what the test compares."""
    import mlxkv  # noqa: F401  (picks the BLAS before MLX loads)
    from mlxkv.memory.layout import layout_from_model

    job = json.loads(job)
    model, prompt = load_job_model(job, shard=True)
    results = run_job(model, prompt, job)
    rank = mx.distributed.init().rank()
    summary = {spec: {"tokens": r["tokens"], "kv_bytes": r["kv_bytes"]} for spec, r in results.items()}
    summary["layout"] = layer_shapes(layout_from_model(model))
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    mx.save_safetensors(str(Path(out, f"rank{rank}.safetensors")),
                        {spec: r["log_probs"] for spec, r in results.items()})


# -- launching ------------------------------------------------------------------------------
def launch(*command: str, ranks: int = RANKS) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n RANKS --hosts 127.0.0.1 -- COMMAND``, killed as a group on timeout."""
    from mlxkv.distributed import free_loopback_ports

    launcher = Path(sys.executable).with_name("mlx.launch")
    args = [str(launcher), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1",
            "--starting-port", str(free_loopback_ports(ranks)), "--", *command]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch did not finish in {LAUNCH_TIMEOUT} s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def failed(out: subprocess.CompletedProcess) -> bool:
    """mlx.launch exits 0 whatever its ranks do; it says so on stderr."""
    return out.returncode != 0 or "exited with code" in out.stderr or "was killed" in out.stderr


def launch_ranks(tmp_path: Path, job: dict, ranks: int = RANKS) -> tuple[list[dict], list[dict]]:
    out = launch(sys.executable, __file__, "rank", json.dumps(job), str(tmp_path), ranks=ranks)
    assert not failed(out), out.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    log_probs = [mx.load(str(tmp_path / f"rank{r}.safetensors")) for r in range(ranks)]
    return summaries, log_probs


def kld(reference: mx.array, other: mx.array) -> float:
    """Mean KL(reference || other) over positions, in nats."""
    return (mx.exp(reference) * (reference - other)).sum(axis=-1).mean().item()


def gap(reference: mx.array, other: mx.array) -> float:
    """The largest |log p| difference over the tokens ``reference`` gives p > 1e-3."""
    return mx.max(mx.where(reference > -6.9, mx.abs(reference - other), 0)).item()


def check_against_one_process(reference: dict[str, dict], summaries: list[dict], log_probs: list[dict],
                              specs: tuple[str, ...], exact: tuple[str, ...] = EXACT) -> dict[str, dict]:
    measured = {}
    for spec in specs:
        one = reference[spec]
        assert all(s[spec]["tokens"] == summaries[0][spec]["tokens"] for s in summaries)  # ranks agree
        assert all(s[spec]["kv_bytes"] * len(summaries) == one["kv_bytes"] for s in summaries), spec  # a share each
        assert all(mx.array_equal(lp[spec], log_probs[0][spec]).item() for lp in log_probs)  # one all_sum result
        measured[spec] = {"tokens equal": summaries[0][spec]["tokens"] == one["tokens"],
                          "kld": kld(one["log_probs"], log_probs[0][spec]),
                          "gap": gap(one["log_probs"], log_probs[0][spec])}
    for spec in specs:
        if spec in exact:
            assert summaries[0][spec]["tokens"] == reference[spec]["tokens"], (spec, measured)
            assert measured[spec]["kld"] < KLD_NOISE and measured[spec]["gap"] < GAP_NOISE, (spec, measured)
    return measured


# -- the tests ------------------------------------------------------------------------------
def test_tiny_model_over_three_ranks_matches_one_process(tmp_path):
    from mlxkv.memory.layout import layout_from_model

    summaries, log_probs = launch_ranks(tmp_path, TINY_JOB)
    model, prompt = load_job_model(TINY_JOB)
    reference = run_job(model, prompt, TINY_JOB)
    measured = check_against_one_process(reference, summaries, log_probs, CONFIGS)
    # the quantized caches really pack tokens and change the logits (else the comparison proves little)
    assert reference["q4-kivi-rot"]["kv_bytes"] < reference["fp16"]["kv_bytes"] / 2
    assert reference["q4-kivi-rot"]["tokens"] != reference["fp16"]["tokens"]
    assert gap(reference["fp16"]["log_probs"], reference["q8"]["log_probs"]) > 5 * GAP_NOISE
    # each rank's probed layout is the planner's per-rank layout of the whole model: one rule
    per_rank = layout_from_model(model).per_rank(RANKS)
    assert all(s["layout"] == layer_shapes(per_rank) for s in summaries)
    assert [layer[0] for layer in summaries[0]["layout"]] == [1, 1]  # one KV head of three per rank
    print(f"against one process: {measured}")


def test_pipeline_over_two_ranks(tmp_path):
    """--pipeline: each of 2 ranks runs one of the 2 layers, with mlxkv's caches (whose ``keys``
    anchor carries the stage's send, as mlx-lm's pipelined models expect) and mlx-lm's."""
    configs = ("fp16", "q8", "q4-kivi-rot", "mlxlm-fp16", "mlxlm-q8")
    job = {"model": "tiny", "arch": "qwen2", "shape": {"hidden_size": 256, "tie_word_embeddings": False},
           "pipeline": True, "configs": configs, "steps": 6, "chunk": 48}
    summaries, log_probs = launch_ranks(tmp_path, job, ranks=2)
    reference = run_job(*load_job_model(job), job)
    check_against_one_process(reference, summaries, log_probs, configs, exact=configs)
    assert [len(s["layout"]) for s in summaries] == [1, 1]  # one layer each, with all its heads


def test_the_sizes_a_model_splits_into():
    from mlxkv.errors import UserError
    from mlxkv.loading.tiny import tiny_model
    from mlxkv.memory.layout import layout_from_model

    layout = layout_from_model(tiny_model("llama"))  # 4 query and 2 KV heads, 2 layers
    assert [layer.kv_heads for layer in layout.per_rank(2).layers] == [1, 1]
    with pytest.raises(UserError, match="2 KV heads, 4 query heads and an MLP 128 wide, which do not divide by 3; "
                                        "use 1 or 2 ranks"):
        layout.per_rank(3)
    with pytest.raises(UserError, match="use 1 or 3 ranks"):
        layout_from_model(tiny_model("llama", **TINY)).per_rank(2)
    assert layout.per_rank(2, pipeline=True).layers == layout.layers[:1]  # whole layers, all heads
    with pytest.raises(UserError, match="this model has 2; use at most 2 ranks"):
        layout.per_rank(3, pipeline=True)


@pytest.mark.real_model
def test_default_model_over_three_ranks_matches_one_process(tmp_path, cut_model_dir):
    job = real_job(str(cut_model_dir))
    summaries, log_probs = launch_ranks(tmp_path, job)
    reference = run_job(*load_job_model(job), job)
    measured = check_against_one_process(reference, summaries, log_probs, EXACT)
    assert reference["q4-kivi-rot"]["kv_bytes"] < reference["fp16"]["kv_bytes"] / 2  # tokens were packed
    assert gap(reference["fp16"]["log_probs"], reference["q8"]["log_probs"]) > 5 * GAP_NOISE
    print(f"against one process: {measured}")


def test_plan_per_rank_is_a_model_with_a_third_of_the_heads():
    """Per rank, the planner counts a third of the KV heads: the same bytes, config by config, as
    a model whose config says one KV head (and 3 query heads, an MLP a third as wide)."""
    from mlxkv.memory.layout import layout_from_config
    from mlxkv.memory.planner import candidate_configs, plan
    from mlxkv.loading.model_config import model_source

    try:
        config = model_source(None).config  # the default model's GGUF header
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    configs = candidate_configs(None, skip_invalid=True)[0]
    per_rank = plan(layout_from_config(config).per_rank(RANKS), 4096, 2**34, 0, configs)
    third = {**config, "num_key_value_heads": 1, "num_attention_heads": 3, "head_dim": 64, "intermediate_size": 512}
    assert [r.kv_bytes for r in per_rank] == [r.kv_bytes for r in plan(layout_from_config(third), 4096, 2**34, 0,
                                                                        configs)]


def test_plan_cli_ranks_errors_are_one_line(capsys):
    from mlxkv.cli.main import main

    assert main(["plan", "--ranks", "2"]) == 2
    assert "which do not divide by 2; use 1 or 3 ranks" in capsys.readouterr().err
    assert main(["plan", "--ranks", "2", "--pipeline"]) == 2
    assert "mlx-lm cannot split llama models pipeline-parallel; drop --pipeline" in capsys.readouterr().err


def _kv_sizes(line: str) -> list[str]:
    return re.search(r"KV cache ([^(|]+)\(", line).group(1).strip().split(" / ")


@pytest.mark.real_model
def test_generate_cli_over_three_ranks(cut_model_dir, capsys):
    flags = ["generate", "--model", str(cut_model_dir), "--kv-bits", "4", "--max-tokens", "8",
             "--prompt", "What is the capital of France?"]
    one = subprocess.run([sys.executable, "-m", "mlxkv", *flags], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    sharded = launch(sys.executable, "-m", "mlxkv", *flags)
    assert not failed(sharded), sharded.stderr[-3000:]
    assert sharded.stdout == one.stdout  # the same text, printed once (rank 0)
    assert sharded.stderr.count("prompt:") == 1 and "sharded over 3 ranks, tensor parallel" in sharded.stderr
    per_rank = next(line for line in sharded.stderr.splitlines() if "per rank (0-2)" in line)
    single_kv = re.search(r"KV cache: ([\d.]+ [KMG]?B)", one.stderr).group(1)
    from mlxkv.units import parse_bytes

    sizes = [parse_bytes(s, "size") for s in _kv_sizes(per_rank)]
    single = parse_bytes(single_kv, "size")
    assert len(sizes) == RANKS and all(abs(RANKS * s - single) <= 0.01 * single for s in sizes)

    # the planner's weights per rank are what a rank holds after sharding (CPU: float32)
    held = parse_bytes(re.search(r"weights ([\d.]+ [KMG]?B) on rank 0", sharded.stderr).group(1), "size")
    from mlxkv.cli.main import main

    assert main(["plan", "--model", str(cut_model_dir), "--ranks", "3", "--dtype", "float32", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["rows"][0]["weights_bytes"]
    assert abs(planned - held) <= 0.01 * held


@pytest.mark.real_model
def test_two_ranks_cannot_split_three_kv_heads(real_model_dir):
    out = launch(sys.executable, "-m", "mlxkv", "generate", "--model", str(real_model_dir), "--max-tokens", "1",
                 ranks=2)
    assert "Node with rank 0 exited with code 2" in out.stderr  # rank 1 waits to be stopped
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlxkv: error")]
    assert errors == ["mlxkv: error: tensor parallelism splits the attention heads and the MLP over the ranks, and "
                      "this model has 3 KV heads, 9 query heads and an MLP 1536 wide, which do not divide by 2; "
                      "use 1 or 3 ranks"]


def measure(argv: list[str]) -> None:
    """``python tests/test_distributed.py measure [--layers N] [--steps N] CONFIG...``: the default
    model over 3 ranks against one process, config by config, as a markdown table."""
    import argparse
    import tempfile

    from mlxkv.loading import default_model_path
    from mlxkv.loading.loader import import_gguf_cached

    p = argparse.ArgumentParser(prog="test_distributed.py measure")
    p.add_argument("--layers", type=int, help="the default model's first N layers (default: all 30)")
    p.add_argument("--steps", type=int, default=8, help="greedy tokens (default 8)")
    p.add_argument("configs", nargs="+")
    args = p.parse_args(argv)
    global LAUNCH_TIMEOUT
    LAUNCH_TIMEOUT = 3600  # a measurement, not a test: the whole model takes minutes per config here
    job = real_job(str(import_gguf_cached(default_model_path())), args.configs, args.layers, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        summaries, log_probs = launch_ranks(Path(tmp), job)
    reference = run_job(*load_job_model(job), job)
    print("| config | tokens equal | first differing token | KL divergence | largest log p gap | KV bytes per rank "
          "x one process |\n|---|---|---|---|---|---|")
    for spec in job["configs"]:
        ours, one = summaries[0][spec]["tokens"], reference[spec]["tokens"]
        first = next((i for i, (a, b) in enumerate(zip(ours, one)) if a != b), None)
        print(f"| {spec} | {ours == one} | {'-' if first is None else first} | "
              f"{kld(reference[spec]['log_probs'], log_probs[0][spec]):.2g} | "
              f"{gap(reference[spec]['log_probs'], log_probs[0][spec]):.2g} | "
              f"{summaries[0][spec]['kv_bytes'] / reference[spec]['kv_bytes']:.4f} |")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "rank":
    rank_main(*sys.argv[2:])
elif __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "measure":
    measure(sys.argv[2:])


@pytest.mark.real_model
def test_serve_over_three_ranks_answers_like_one_process(cut_model_dir):
    """mlxkv serve under mlx.launch: rank 0 listens and announces each step; every rank runs it
    (LockstepEngine). Concurrent greedy answers equal the one-process answers."""
    import threading
    import urllib.request

    import mlxkv
    from mlxkv.distributed import free_loopback_ports
    from mlxkv.engine import SamplingParams, Session
    from mlxkv.engine.prompts import encode_chat

    questions = ["What is the capital of France?", "Name a color."]
    model, tokenizer = mlxkv.load(str(cut_model_dir))
    alone = []
    for q in questions:
        session = Session(model, tokenizer, mlxkv.KVConfig.from_name("q4-kivi-rot"))
        messages = [{"role": "user", "content": q}]
        alone.append("".join(t.text for t in session.generate(encode_chat(tokenizer, messages),
                                                              SamplingParams(max_tokens=6))))
    port = free_loopback_ports(1)
    launcher = Path(sys.executable).with_name("mlx.launch")
    proc = subprocess.Popen(
        [str(launcher), "--backend", "ring", "-n", str(RANKS), "--hosts", "127.0.0.1", "--starting-port",
         str(free_loopback_ports(RANKS)), "--", sys.executable, "-m", "mlxkv", "serve", "--model", str(cut_model_dir),
         "--kv-bits", "4", "--port", str(port), "--kv-memory", "64MB", "--prompt-cache-bytes", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            body = json.dumps({"messages": [{"role": "user", "content": questions[i]}], "max_tokens": 6}).encode()
            request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=LAUNCH_TIMEOUT) as response:
                answers[i] = json.loads(response.read())["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LAUNCH_TIMEOUT)
        assert [answers.get(i) for i in range(len(questions))] == alone
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
