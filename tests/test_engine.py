"""The engine against sessions run alone: continuous batching changes no answer, the prefix
cache reuses what it should, and admission refuses or queues what does not fit."""

from __future__ import annotations

import functools

import mlx.core as mx
import pytest

from mlxkv.config import KVConfig
from mlxkv.engine import Engine, RequestError, SamplingParams, Session
from mlxkv.loading.tiny import tiny_model


class Tokenizer:
    """Enough of mlx-lm's TokenizerWrapper for token-id prompts: ids in, ids out as text."""

    eos_token_id = 0
    eos_token_ids = {0}
    chat_template = None

    @property
    def detokenizer(self):
        return Detokenizer()


class Detokenizer:
    def __init__(self) -> None:
        self.last_segment = ""

    def reset(self) -> None:
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = f"<{token}>"

    def finalize(self) -> None:
        self.last_segment = ""


@functools.lru_cache(maxsize=None)
def model():
    return tiny_model("llama", head_dim=64)


def prompt(n: int, seed: int) -> list[int]:
    return mx.random.randint(1, 256, (n,), key=mx.random.key(seed)).tolist()


def alone(config, tokens, params):
    session = Session(model(), Tokenizer(), config)
    return [t.id for t in session.generate(tokens, params)]


@pytest.mark.parametrize("name", ["fp16", "q4-kivi-rot", "k4v3-rot", "q4:max_kv=40", "fp16:max_kv=48:evict=h2o"])
def test_continuous_batching_gives_each_request_its_own_answer(name):
    config = KVConfig.from_name(name)
    engine = Engine(model(), Tokenizer(), config, max_batch=3)
    asks = [(prompt(n, seed), SamplingParams(max_tokens=m, temperature=t, seed=seed))
            for seed, (n, m, t) in enumerate([(7, 30, 0), (33, 8, 0), (60, 25, 0.8), (12, 18, 0), (3, 12, 1.0)])]
    requests = [engine.submit(tokens, params) for tokens, params in asks]
    engine.run_until_idle()  # 5 requests through 3 rows: sequences leave and join between steps
    for request, (tokens, params) in zip(requests, asks):
        assert request.generated == alone(config, tokens, params), request.id
        assert request.finish_reason in ("length", "stop")
    assert engine.metrics().active == 0 and engine.metrics().batched


def test_prefix_cache_reuses_the_conversation_so_far():
    config = KVConfig.from_name("q4-kivi-rot")
    engine = Engine(model(), Tokenizer(), config, prefix_cache_bytes=64 * 2**20)
    first = prompt(80, 1)
    answer = engine.generate([first], SamplingParams(max_tokens=10))[0]
    follow_up = first + answer.generated + prompt(9, 2)  # the next turn: history + the answer + a new message
    again = engine.generate([follow_up], SamplingParams(max_tokens=10))[0]
    assert again.usage.cached_tokens == 80 + 10 - 1  # all but the last answer token, which was never fed
    assert again.generated == alone(config, follow_up, SamplingParams(max_tokens=10))
    other = engine.generate([prompt(50, 3)], SamplingParams(max_tokens=4))[0]
    assert other.usage.cached_tokens == 0


def test_admission_refuses_what_never_fits_and_queues_what_does_not_fit_now():
    config = KVConfig.from_name("q8")
    probe = Engine(model(), Tokenizer(), config)
    one = probe.reservation(100 + 20)
    engine = Engine(model(), Tokenizer(), config, kv_budget=2 * one, max_queue=1)
    with pytest.raises(RequestError) as never:
        engine.submit(prompt(1500, 0), SamplingParams(max_tokens=20))
    assert never.value.status == 400 and "KV budget" in str(never.value)
    with pytest.raises(RequestError) as too_long:
        engine.submit(prompt(10, 0), SamplingParams(max_tokens=10**6))
    assert too_long.value.status == 400 and "context" in str(too_long.value)
    a = engine.submit(prompt(100, 1), SamplingParams(max_tokens=20))
    engine.step()  # a is admitted
    b = engine.submit(prompt(100, 2), SamplingParams(max_tokens=20))
    with pytest.raises(RequestError) as full:
        engine.submit(prompt(100, 3), SamplingParams(max_tokens=20))
    assert full.value.status == 429
    engine.step()
    assert engine.metrics().active == 2  # two fit the budget together
    engine.run_until_idle()
    assert a.done and b.done


def test_cancel_frees_the_row_and_its_memory():
    engine = Engine(model(), Tokenizer(), KVConfig.from_name("q4"), max_batch=4)
    keep = engine.submit(prompt(20, 1), SamplingParams(max_tokens=40))
    gone = engine.submit(prompt(300, 2), SamplingParams(max_tokens=40))
    for _ in range(6):
        engine.step()
    with_both = engine.metrics().kv_bytes
    gone.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled" and engine.metrics().active == 1
    assert engine.metrics().kv_bytes < with_both
    engine.run_until_idle()
    assert keep.generated == alone(KVConfig.from_name("q4"), keep.prompt, SamplingParams(max_tokens=40))


def test_stop_strings_end_the_answer_without_them():
    engine = Engine(model(), Tokenizer(), KVConfig())
    tokens = prompt(10, 4)
    full = alone(KVConfig(), tokens, SamplingParams(max_tokens=12))
    stop = f"<{full[5]}>"
    request = engine.generate([tokens], SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert request.finish_reason == "stop" and stop not in request.text
    assert request.text == "".join(f"<{t}>" for t in full[: full.index(full[5])])


def test_a_process_that_ran_the_engine_thread_exits_cleanly():
    """MLX aborts at exit ("terminate called without an active exception") unless the thread
    that ran it frees its streams: the engine thread does."""
    import subprocess
    import sys

    code = (
        "import mlxkv\n"
        "from mlxkv.engine import Engine, SamplingParams\n"
        "from mlxkv.loading.tiny import tiny_model\n"
        "from tests.test_engine import Tokenizer\n"
        "engine = Engine(tiny_model('llama', head_dim=64), Tokenizer(), mlxkv.KVConfig.from_name('q4')).start()\n"
        "print(len(engine.submit(list(range(1, 40)), SamplingParams(max_tokens=5)).result()))\n"
        "engine.stop()\n"
    )
    from pathlib import Path

    for _ in range(3):  # without the fix most runs abort, not all
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-500:]
