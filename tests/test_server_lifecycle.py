"""``mlxkv serve`` under pressure: a full queue, clients that hang up, SIGTERM mid-stream, bad flags.

The server runs a tiny random model with the real tokenizer (the real chat template and
detokenizer at a few milliseconds a token) where the answers' content does not matter;
the SIGTERM test runs the real command on the real model in a subprocess.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from server_harness import MODEL_NAME, openai, port_of, serving

from mlxkv.cli.main import main
from mlxkv.config import KVConfig
from mlxkv.engine import Engine, SamplingParams
from mlxkv.loading.tiny import tiny_model

LONG = 3000  # tokens: a stream this long is still running when the test acts on it


@functools.lru_cache(maxsize=None)
def tiny(vocab_size: int):
    return tiny_model("llama", vocab_size=vocab_size, head_dim=64)


@pytest.fixture(scope="module")
def tokenizer(real_model):
    return real_model[1]


def tiny_engine(tokenizer, **kwargs) -> Engine:
    return Engine(tiny(tokenizer.vocab_size), tokenizer, KVConfig.from_name("q4"), **kwargs)


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kwargs)


def test_a_full_queue_gets_429_and_the_next_request_is_served(tokenizer):
    with serving(tiny_engine(tokenizer, max_batch=1, max_queue=1)) as server:
        client = server.client()
        running = chat(client, "one", max_tokens=LONG, stream=True)
        assert next(iter(running)).choices[0].delta.role == "assistant"
        waiting = chat(client, "two", max_tokens=4, stream=True)  # headers come at once; it waits for the row
        assert server.wait_metrics(lambda m: m["mlxkv_queued_requests"] == 1)["mlxkv_queued_requests"] == 1
        with pytest.raises(openai.RateLimitError) as full:
            chat(client, "three", max_tokens=4)
        assert full.value.status_code == 429 and full.value.body["code"] == "queue_full"
        running.close()  # the first client hangs up: its row goes to the waiting request
        chunks = list(waiting)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert chat(client, "four", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_clients_that_hang_up_free_their_rows_and_cache_memory(tokenizer):
    with serving(tiny_engine(tokenizer, max_batch=4, max_queue=8, prefix_cache_bytes=2**24)) as server:
        client = server.client()
        chat(client, "warm up", max_tokens=2)  # one finished conversation in the prefix cache
        baseline = server.metrics()
        assert baseline["mlxkv_kv_bytes_in_use"] == 0 and baseline["mlxkv_prefix_cache_entries"] == 1
        streams = [chat(client, f"story number {i}", max_tokens=LONG, stream=True) for i in range(4)]
        for stream in streams:
            for _, _ in zip(range(3), stream):
                pass
        busy = server.wait_metrics(lambda m: m["mlxkv_active_sequences"] == 4)
        assert busy["mlxkv_active_sequences"] == 4 and busy["mlxkv_kv_bytes_in_use"] > 0
        with pytest.raises(openai.APITimeoutError):  # waits for a row, gives up: cancelled in the queue
            chat(server.client(timeout=0.5), "impatient", max_tokens=LONG)
        for stream in streams:
            stream.close()
        after = server.wait_metrics(lambda m: m["mlxkv_active_sequences"] == 0 and m["mlxkv_queued_requests"] == 0
                                    and m['mlxkv_requests_total{finish_reason="cancelled"}'] == 5)
        assert after["mlxkv_active_sequences"] == 0 and after["mlxkv_queued_requests"] == 0
        assert after['mlxkv_requests_total{finish_reason="cancelled"}'] == 5
        assert after["mlxkv_kv_bytes_in_use"] == baseline["mlxkv_kv_bytes_in_use"]
        assert after["mlxkv_kv_bytes_reserved"] == 0
        # a hung-up conversation's cache may be kept for its next turn, within the prefix cache's own budget
        assert after["mlxkv_prefix_cache_bytes"] <= 2**24
        assert server.engine.metrics().generated_tokens < 4 * LONG  # they stopped early
        assert chat(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_a_seeded_sampled_answer_repeats(tokenizer):
    """OpenAI's seeds are signed 64-bit; the same seed (negative too) gives the same answer."""
    with serving(tiny_engine(tokenizer, max_batch=2)) as server:
        client = server.client()
        answers = [chat(client, "pick a word", max_tokens=8, temperature=1.0, seed=seed).choices[0].message.content
                   for seed in (-7, -7, 2**64 - 7)]
        assert answers[0] == answers[1] == answers[2]  # -7 and 2**64 - 7 are one seed modulo 2**64


def test_the_engine_takes_any_int64_seed(tokenizer):
    engine = tiny_engine(tokenizer)
    request = engine.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=1.0, seed=-1))
    engine.run_until_idle()
    assert request.finish_reason in ("length", "stop")


@pytest.mark.real_model
def test_sigterm_during_a_stream_ends_it_cleanly_and_exits_0(real_model_dir):
    command = [sys.executable, "-m", "mlxkv", "serve", "--model", str(real_model_dir), "--port", "0",
               "--kv-bits", "4", "--kv-memory", "256MB", "--prompt-cache-bytes", "0", "--served-model-name", MODEL_NAME]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port, lines = None, []
        timer = threading.Timer(120, process.kill)  # bounded: a server that never comes up is killed
        timer.start()
        for line in process.stderr:
            lines.append(line)
            port = port_of(line)
            if port:
                break
        timer.cancel()
        assert port, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = chat(client, "Tell me a long story about a dragon.", max_tokens=500, stream=True)
        received = [next(iter(stream)) for _ in range(3)]
        process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for chunk in stream:
                received.append(chunk)
        assert process.wait(timeout=60) == 0
        rest = process.stderr.read()
        assert "cancelled (shutdown)" in rest and "Traceback" not in rest, rest
        assert len(received) < 500
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flags, says", [
    (["--port", "70000"], "--port must be in 0-65535"),
    (["--kv-memory", "lots"], "--kv-memory"),
    (["--max-batch", "0"], "--max-batch"),
    (["--kv-bits", "auto"], "--kv-bits auto"),
    (["--kv-bits", "7"], "bits=7 is not supported"),
    (["--temp", "-1"], "--temp"),
])
def test_bad_flags_are_one_line_errors_before_the_model_loads(flags, says, capsys):
    assert exit_code(["serve", "--model", "/nonexistent/model", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = exit_code(["serve", "--model", "/nonexistent/model", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass another --port" in err, err


def exit_code(argv: list[str]) -> int:
    """The command's exit status, whether argparse exits or ``run`` returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
