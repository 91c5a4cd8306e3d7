"""Where MLX runs and what that implies: optimized BLAS on Linux CPUs, float32 on CPU devices.

This module must be imported before ``mlx.core``: MLX's Linux CPU wheel links a
reference BLAS (~3 GFLOP/s here); loading an optimized BLAS with RTLD_GLOBAL
first makes MLX's matmuls resolve to it (~115 GFLOP/s with OpenBLAS).
Set ``MLXKV_BLAS=off`` to keep the bundled one, or to a path to choose a library.
"""

from __future__ import annotations

import ctypes
import os
import sys

_BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

blas_library: str | None = None
"""The optimized BLAS that MLX uses in this process, or None for MLX's own."""


def _preload_blas() -> str | None:
    choice = os.environ.get("MLXKV_BLAS", "auto")
    if choice == "off" or not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already resolved its symbols
        return None
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "blas" in preloaded:
        return preloaded
    candidates = (choice,) if choice != "auto" else _BLAS_CANDIDATES
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


blas_library = _preload_blas()

import mlx.core as mx  # noqa: E402  (after the BLAS preload, on purpose)


def is_cpu() -> bool:
    """True when MLX computes on the CPU (Linux, or a Mac forced to the CPU)."""
    return mx.default_device().type == mx.DeviceType.cpu


def compute_dtype(model_dtype: mx.Dtype = mx.float16) -> mx.Dtype:
    """The dtype to compute in: float16/bfloat16 math on MLX's CPU backend is 20-40x
    slower than float32, so CPU devices use float32; GPUs keep the model's dtype."""
    return mx.float32 if is_cpu() else model_dtype


def machine_info() -> dict[str, str]:
    """Machine, chip, OS and library versions: recorded with every benchmark and eval result."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    chip = str(info.get("device_name") or info.get("architecture") or platform.processor() or "unknown")
    return {
        "machine": platform.machine(),
        "chip": chip,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "device": str(mx.default_device()),
        "blas": blas_library or "mlx built-in",
        "mlx": pkg("mlx"),
        "mlx_lm": pkg("mlx-lm"),
        "mlxkv": pkg("mlxkv"),
    }
