"""The servers a serving benchmark compares, as processes on 127.0.0.1: mlxkv's and mlx_lm.server.

Both load the same weights: an mlx-lm directory of float32 weights written from the model
mlxkv loads (the default GGUF dequantized, as mlxkv runs it on a CPU), so the only
difference between them is the server, its batching and its KV cache.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlxkv.errors import UserError

READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


@dataclass(frozen=True)
class ServerSpec:
    """``label`` for tables; ``command`` without ``--port``; ``model``: the id its requests send."""

    label: str
    command: tuple[str, ...]
    model: str


def server_specs(model_dir: Path, max_batch: int, mlxkv_configs: dict[str, list[str]],
                 mlx_lm: dict[str, list[str]]) -> list[ServerSpec]:
    """One spec per mlxkv KV config (label -> its flags) and per mlx_lm.server variant."""
    mlxkv = [sys.executable, "-m", "mlxkv", "serve", "--model", str(model_dir), "--max-batch", str(max_batch),
             "--max-queue", "256", "--served-model-name", "bench", "--log-level", "warning"]
    specs = [ServerSpec(label, tuple(mlxkv + flags), "bench") for label, flags in mlxkv_configs.items()]
    reference = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--log-level", "WARNING",
                 "--decode-concurrency", str(max_batch)]
    specs += [ServerSpec(label, tuple(reference + flags), "default_model") for label, flags in mlx_lm.items()]
    return specs


def float32_model_dir(target: Path, model: str | None = None) -> Path:
    """An mlx-lm directory with ``model``'s weights as mlxkv loads them on a CPU (float32,
    dequantized), for servers that must run the very same weights. Reused when present."""
    import mlx.core as mx
    from mlx_lm.utils import save_model

    import mlxkv
    from mlxkv.loading import load_info

    if (target / "config.json").is_file():
        return target
    loaded, _ = mlxkv.load(model, dtype="float32")
    info = load_info(loaded)
    source = info.model_dir
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(partial, loaded, donate_model=False)
    config = json.loads((source / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, partial / name)
    mx.clear_cache()
    partial.rename(target)  # whole or not at all
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A server process on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, spec: ServerSpec, log: Path) -> None:
        self.spec, self.port = spec, free_port()
        self.log = open(log, "w")
        self.process = subprocess.Popen([*spec.command, "--port", str(self.port)], stdout=self.log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"{self.spec.label} exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise UserError(f"{self.spec.label} did not answer within {READY_TIMEOUT_S} s; see {self.log.name}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
