"""Benchmarks: tokens/s and memory of KV configs, ours beside mlx-lm's, in one process."""

from mlxkv.bench.runner import DEFAULT_CONFIGS, DEFAULT_CONTEXTS, run_bench

__all__ = ["DEFAULT_CONFIGS", "DEFAULT_CONTEXTS", "run_bench"]
