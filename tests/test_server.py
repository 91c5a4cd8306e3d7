"""``mlxkv serve`` on the real default model, through the official openai client: answers,
streams, concurrency against each request run alone, prefix reuse, and every bad request."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server_harness import MODEL_NAME, error_of, http, openai, serving

from mlxkv.engine.prompts import encode_chat
from mlxkv.config.request import KVRequest
from mlxkv.engine import Engine, SamplingParams, Session

pytestmark = pytest.mark.real_model

MAX_TOKENS = 8
BUDGET_TOKENS = 4096  # the KV budget: one sequence of this many tokens (many short ones)


@pytest.fixture(scope="module")
def q4(real_model):
    """``--kv-bits 4`` as the CLI resolves it for this model."""
    return KVRequest(bits=4).resolve(real_model[0])


@pytest.fixture(scope="module")
def server(real_model, q4):
    model, tokenizer = real_model
    probe = Engine(model, tokenizer, q4)
    engine = Engine(model, tokenizer, q4, max_batch=8, kv_budget=probe.reservation(BUDGET_TOKENS),
                    max_queue=16, prefix_cache_bytes=64 * 2**20)
    with serving(engine) as running:
        yield running


def alone(real_model, config, messages, max_tokens=MAX_TOKENS) -> str:
    """The answer of the engine's single-sequence path (Session), no server, no batch."""
    model, tokenizer = real_model
    session = Session(model, tokenizer, config)
    return "".join(t.text for t in session.generate(encode_chat(tokenizer, messages), SamplingParams(max_tokens)))


def test_chat_and_completions_whole_and_streamed(server, real_model):
    client = server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS)
    prompt_tokens = len(encode_chat(real_model[1], messages))
    assert whole.model == MODEL_NAME and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and "Paris" in whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens

    prompt = "The three primary colors are"
    done = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, stop=["\n\n"])
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, stop=["\n\n"],
                                              stream=True))
    assert done.object == "text_completion" and done.choices[0].text
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert done.usage.prompt_tokens == len(real_model[1].encode(prompt))
    assert "\n\n" not in done.choices[0].text
    ids = client.completions.create(model=MODEL_NAME, prompt=real_model[1].encode(prompt), max_tokens=6, stop=["\n\n"])
    assert ids.choices[0].text == done.choices[0].text  # token ids in, the same answer

    listed = client.models.list()
    assert [m.id for m in listed.data] == [MODEL_NAME]
    assert http(server.url + "/health") == (200, '{"status":"ok"}')


def test_concurrent_greedy_requests_each_get_their_answer_alone(server, real_model, q4):
    """8 at once, batched on `--kv-bits 4` caches: each answer is the one the request gets alone.
    Each has its own system message, so no prefix is shared and every prompt is prefilled whole."""
    asks = [[{"role": "system", "content": f"{who} Answer briefly."}, {"role": "user", "content": question}]
            for who, question in [
                ("You are a geographer.", "Name a long river."), ("You are a cook.", "How do I boil an egg?"),
                ("You are a poet.", "Write about the sea."), ("You are a teacher.", "What is 7 times 8?"),
                ("Pretend to be a cat.", "What do you like?"), ("You are a historian.", "Who built the pyramids?"),
                ("You speak French.", "Say hello."), ("You are terse.", "List three colors."),
            ]]
    expected = [alone(real_model, q4, messages) for messages in asks]
    client = server.client()
    widest = []
    done = threading.Event()

    def watch():
        while not done.wait(0.05):
            widest.append(server.metrics()["mlxkv_active_sequences"])

    def ask(messages):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS)
        return reply.choices[0].message.content

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
    finally:
        done.set()
        watcher.join()
    assert answers == expected
    assert max(widest) > 1, "the requests were never decoded together"


def test_a_continued_conversation_reuses_the_cached_prefix(server, real_model):
    client = server.client()
    first = [{"role": "system", "content": "You are a careful assistant for a museum."},
             {"role": "user", "content": "Name one painting by Vermeer."}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=first, max_tokens=MAX_TOKENS)
    follow = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "Where is it kept?"}]
    again = client.chat.completions.create(model=MODEL_NAME, messages=follow, max_tokens=4)
    first_prompt = len(encode_chat(real_model[1], first))
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first_prompt <= cached < again.usage.prompt_tokens  # all of the first turn, not the new one
    assert server.metrics()["mlxkv_prefix_cache_hits_total"] >= 1


def _chat(**fields) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields})


BAD_REQUESTS = [
    # (path, raw body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", "[1, 2]", 400, None, None),
    ("/v1/chat/completions", json.dumps({"max_tokens": 2}), 400, "messages", None),
    ("/v1/chat/completions", json.dumps({"messages": "Hi"}), 400, "messages", None),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "king", "content": "x"}]}), 400,
     "messages[0].role", None),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}), 400,
     "messages[0].content", None),
    ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens", None),
    ("/v1/chat/completions", _chat(max_completion_tokens=-3), 400, "max_completion_tokens", None),
    ("/v1/chat/completions", _chat(max_tokens="ten"), 400, "max_tokens", None),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature", None),
    ("/v1/chat/completions", _chat(top_p=1.5), 400, "top_p", None),
    ("/v1/chat/completions", _chat(stop=7), 400, "stop", None),
    ("/v1/chat/completions", _chat(stream="yes"), 400, "stream", None),
    ("/v1/chat/completions", _chat(n=2), 400, "n", None),
    ("/v1/chat/completions", _chat(seed=2**70), 400, "seed", None),
    ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", _chat(max_tokens=9000), 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", _chat(max_tokens=BUDGET_TOKENS + 500), 400, "messages", "kv_budget_exceeded"),
    ("/v1/completions", json.dumps({"max_tokens": 2}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"prompt": {"text": "x"}}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"prompt": [1, 10**9]}), 400, "prompt", None),
    ("/v1/embeddings", json.dumps({"input": "x"}), 404, None, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    for path, body, status, param, code in BAD_REQUESTS:
        got, text = http(server.url + path, body)
        assert got == status, (path, body, text)
        error = error_of(text)
        assert (error["param"], error["code"]) == (param, code), (body, error)
    got, text = http(server.url + "/v1/chat/completions", method="GET")
    assert got == 405 and error_of(text)
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    words = "word " * 9000  # longer than the model's context of 8,192 tokens
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL_NAME, prompt=words, max_tokens=1)
    assert long.value.body["code"] == "context_length_exceeded"
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].message.content  # still serving
    refused = server.metrics()
    assert refused['mlxkv_refused_requests_total{status="400"}'] >= len([b for b in BAD_REQUESTS if b[2] == 400])
