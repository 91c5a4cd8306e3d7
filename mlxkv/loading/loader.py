"""One entry point to get (model, tokenizer) from whatever the user names.

A short model name (``models.MODELS``) or a GGUF file is imported once into a cached mlx-lm
directory; a directory or a Hugging Face repo id goes to ``mlx_lm.load``. On a CPU device the quantized weights are
dequantized to float32 by default: MLX's CPU quantized matrix-matrix kernel is ~15x
slower than a float32 matmul through OpenBLAS, so prefill would crawl, and float16
math on the CPU is slower still. Nothing is printed: what happened is recorded in
a LoadInfo on the model, read with ``load_info(model)``, for the CLI to report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxkv.device import is_cpu
from mlxkv.errors import UserError
from mlxkv.units import format_bytes
from mlxkv.loading.gguf_file import is_gguf
from mlxkv.loading.gguf_import import IMPORT_FORMAT_VERSION, import_gguf
from mlxkv.loading.models import cache_root, default_model_path, named_model_path

STALE_IMPORT_SECONDS = 3600  # a temporary import directory this old was left by a killed process


@dataclass(frozen=True)
class LoadInfo:
    """What ``load`` did, for the caller to report; read it with ``load_info(model)``. A plain
    dataclass: an ``nn.Module`` files dict attributes among its parameters, not this."""

    source: str  # what was asked for: a path, a repo id, or the default model's GGUF
    model_dir: Path  # the mlx-lm directory actually loaded
    dequantized: bool  # quantized weights were expanded to floats after loading
    quantized: bool  # some weights are still packed
    dtype: str  # dtype(s) of the floating-point weights, e.g. "float32"
    weights_bytes: int  # bytes of all parameters as loaded
    note: str  # one line for a person: what was loaded and how
    load_transient_bytes: int | None = None  # MLX's peak during the load above what it left (None: unseen)


def cached_import_dir(gguf_path: Path) -> Path:
    """The cache directory for one GGUF file: named by its stem, keyed by path, size, mtime and
    importer version, so an edited file or a newer importer gets a fresh import."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{IMPORT_FORMAT_VERSION}"
    return cache_root() / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _remove_stale_imports(target: Path) -> None:
    for leftover in target.parent.glob(f".{target.name}.importing-*"):
        if time.time() - leftover.stat().st_mtime > STALE_IMPORT_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)


def import_gguf_cached(gguf_path: Path) -> Path:
    """The imported model directory for ``gguf_path``, importing it on first use."""
    target = cached_import_dir(gguf_path)
    if (target / "config.json").is_file():
        return target  # imports are published by one rename, so a directory here is complete
    _remove_stale_imports(target)
    return import_gguf(gguf_path, target)


def looks_like_path(name: str) -> bool:
    """A Hugging Face repo id is ``name`` or ``org/name``; anything else was meant as a path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in (".gguf", ".safetensors", ".bin", ".json")
    )


HUB_PROBE_SECONDS = 2.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within 2 s (False when HF_HUB_OFFLINE).

    huggingface_hub retries a failed connection for ~25 s before it gives up; asking first
    lets an offline machine get its one-line error at once. Behind a proxy it cannot be told
    from here, so the Hub is taken as reachable.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS, local_files_only=True))
        except Exception:  # not in the local cache
            if not hub_reachable():
                raise OSError("cannot reach the Hugging Face Hub and the model is not cached") from None
            return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, bad id: all one user-facing answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"could not download {repo_id}: {reason}; pass a local directory or .gguf file"
        ) from None


def resolve_model_dir(model: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """(source, local mlx-lm model directory) for a short name, a GGUF file, a directory or a repo id.
    An existing path wins over a short name of the same spelling."""
    if model is None:
        gguf_path = default_model_path()
        return str(gguf_path), import_gguf_cached(gguf_path)
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return name, path
    if not path.exists() and (gguf_path := named_model_path(name)) is not None:
        return str(gguf_path), import_gguf_cached(gguf_path)
    if path.is_file():
        if is_gguf(path):
            return name, import_gguf_cached(path)
        raise UserError(f"{name} is not a GGUF file; pass a .gguf file, a model directory or a Hugging Face repo id")
    if looks_like_path(name):
        raise UserError(f"no such file or directory: {name}")
    return name, _download(name)


def _load_model_dir(model_dir: Path) -> tuple[nn.Module, Any]:
    import mlx_lm

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model directory: it has no config.json")
    try:
        return mlx_lm.load(str(model_dir))
    except UserError:
        raise
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load the model in {model_dir}: {reason}") from None


def _is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "group_size") and "scales" in m for _, m in model.named_modules())


def _as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    value = getattr(mx, str(dtype), None)
    if not isinstance(value, mx.Dtype) or not mx.issubdtype(value, mx.floating):
        raise UserError(f"unknown floating-point dtype '{dtype}' (use float32, float16 or bfloat16)")
    return value


def _short_name(source: str) -> str:
    """A local path's last part (the default model's path is long); a repo id as it is."""
    return Path(source).name if Path(source).expanduser().exists() else source


def _float_weights_dtype(model: nn.Module) -> str:
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    return ",".join(sorted(str(d).removeprefix("mlx.core.") for d in dtypes))


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    keep_quantized: bool | None = None,
    dtype: mx.Dtype | str | None = None,
) -> tuple[nn.Module, Any]:
    """Load (model, mlx-lm TokenizerWrapper) from a short model name (``smollm2-135m``,
    ``gemma3-270m``), a .gguf file, a model directory, a Hugging Face repo id, or the
    default model when ``model`` is None.

    ``keep_quantized`` defaults to False on a CPU device (dequantize: faster there) and True
    on a GPU. ``dtype`` casts the floating-point weights; by default float32 on a CPU device
    and the model's own dtype on a GPU. ``load_info(model)`` tells what was done.
    """
    source, model_dir = resolve_model_dir(model)
    target_dtype = _as_dtype(dtype) or (mx.float32 if is_cpu() else None)
    if keep_quantized is None:
        keep_quantized = not is_cpu()

    active_before, peak_before = mx.get_active_memory(), mx.get_peak_memory()
    loaded, tokenizer = _load_model_dir(model_dir)
    was_quantized = _is_quantized(loaded)
    if target_dtype is not None:
        loaded.set_dtype(target_dtype)  # before dequantizing: float32 scales dequantize ~2x faster on CPU
    dequantized = was_quantized and not keep_quantized
    if dequantized:
        from mlx_lm.utils import dequantize_model

        dequantize_model(loaded)
    mx.eval(loaded.parameters())

    weights_dtype = _float_weights_dtype(loaded)
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(loaded.parameters()))
    peak_after = mx.get_peak_memory()  # the load's own peak shows only when it beats every earlier one
    transient = max(0, peak_after - active_before - weights_bytes) if peak_after > peak_before else None
    if dequantized:
        how = f"quantized weights expanded to {weights_dtype} (faster on this device)"
    elif was_quantized:
        how = f"weights kept quantized, other parameters {weights_dtype}"
    else:
        how = f"{weights_dtype} weights"
    loaded.mlxkv_load_info = LoadInfo(
        source=source,
        model_dir=model_dir,
        dequantized=dequantized,
        quantized=was_quantized and not dequantized,
        dtype=weights_dtype,
        weights_bytes=weights_bytes,
        note=f"loaded {_short_name(source)}: {how}, {format_bytes(weights_bytes)}",
        load_transient_bytes=transient,
    )
    return loaded, tokenizer


def load_info(model: nn.Module) -> LoadInfo | None:
    """What ``load`` did for this model (None for a model built another way): the one reader."""
    return getattr(model, "mlxkv_load_info", None)
