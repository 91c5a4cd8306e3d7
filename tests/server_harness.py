"""Running ``mlxkv serve``'s app for real in a test: uvicorn on a free loopback port in a thread,
the official ``openai`` client, and raw HTTP for what a client library would never send."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from mlxkv.engine import Engine  # noqa: E402
from mlxkv.server import Defaults, ServedModel, Server, bind, create_app  # noqa: E402

MODEL_NAME = "test-model"
START_TIMEOUT_S = 30


@dataclass
class Running:
    engine: Engine
    server: Server
    url: str  # http://127.0.0.1:PORT

    def client(self, **kwargs: Any) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics parsed: 'name{labels}' -> value."""
        status, text = http(self.url + "/metrics")
        assert status == 200
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_metrics(self, ok, timeout: float = 20) -> dict[str, float]:
        """Poll /metrics until ``ok(metrics)`` holds (bounded), and return them."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.metrics()
            if ok(seen) or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)


@contextlib.contextmanager
def serving(engine: Engine, defaults: Defaults = Defaults(max_tokens=16)) -> Iterator[Running]:
    """The app on 127.0.0.1 and a free port, in a thread; stopped (and the engine with it) after."""
    served = ServedModel(MODEL_NAME, (), engine.context_limit)
    server = Server(create_app(engine, served, defaults), bind("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    host, port = server.address
    try:
        yield Running(engine, server, f"http://{host}:{port}")
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def http(url: str, body: bytes | str | None = None, method: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, text) of a raw request; error statuses are returned, not raised."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def error_of(text: str) -> dict[str, Any]:
    """The OpenAI error object of a response body, checked for its four fields."""
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def port_of(line: str) -> int | None:
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    return int(found.group(1)) if found else None
