"""Memory over a generation: KV bytes (total and per layer) and MLX's own counters, per step.

    with MemoryTracker(cache, label="q4") as tracker:
        for response in mlx_lm.stream_generate(..., prompt_cache=cache):
            tracker.step()
    tracker.save("memory.json")      # or .csv
    plot_memory_runs([tracker.run], "memory.png")

MLX's counters are process-wide: ``active`` is what arrays hold now (weights, caches,
temporaries), ``peak`` the most ``active`` reached since the tracker started (it resets
MLX's peak counter), ``cache`` what MLX's allocator keeps for reuse beyond ``active``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxkv.errors import UserError
from mlxkv.memory.held import layer_kv_bytes
from mlxkv.units import format_bytes

RECORD_FIELDS = ("tokens", "kv_bytes", "active_bytes", "peak_bytes", "cache_bytes", "elapsed_s")
"""The scalar columns of a record; ``kv_bytes_per_layer`` is a list beside them."""


def cache_tokens(cache: Sequence[Any]) -> int:
    """Tokens the model has seen: the largest ``offset`` among the layer caches."""
    return max((int(getattr(c, "offset", 0) or 0) for c in cache), default=0)


def model_weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, as MLX holds them (dequantized float32 on a CPU device)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@dataclass
class MemoryRun:
    """One run's records and what describes it (label, KV config, model, weights bytes...)."""

    label: str
    records: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class MemoryTracker:
    """Records memory at each ``step()``; usable as a context manager or with ``start()``.

    ``cache``: the per-layer caches (may be attached later with ``attach``); ``label``
    names the run in plots; ``info`` is saved with it (e.g. the KV config).
    """

    def __init__(self, cache: Sequence[Any] | None = None, label: str = "run",
                 model: nn.Module | None = None, **info: Any) -> None:
        self.cache = cache
        self.run = MemoryRun(label, [], dict(info))
        if model is not None:
            self.run.info.setdefault("weights_bytes", model_weights_bytes(model))
        self._start: float | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.run.records

    def attach(self, cache: Sequence[Any]) -> None:
        """Track ``cache`` from now on (when it is made after the tracker starts)."""
        self.cache = cache

    def start(self, reset_peak: bool = True) -> "MemoryTracker":
        """Start the clock; reset MLX's peak counter unless the caller reports the process's
        peak itself (``mlxkv generate`` reports the peak since start, load included)."""
        if reset_peak:
            mx.reset_peak_memory()
        self._start = time.perf_counter()
        return self

    def __enter__(self) -> "MemoryTracker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        return None

    def step(self, tokens: int | None = None) -> dict[str, Any]:
        """Record now. ``tokens``: tokens so far (default: read from the caches' offsets)."""
        if self._start is None:
            self.start()
        per_layer = layer_kv_bytes(self.cache or [])
        record = {
            "tokens": int(tokens) if tokens is not None else cache_tokens(self.cache or []),
            "kv_bytes": sum(per_layer),
            "active_bytes": mx.get_active_memory(),
            "peak_bytes": mx.get_peak_memory(),
            "cache_bytes": mx.get_cache_memory(),
            "elapsed_s": round(time.perf_counter() - self._start, 6),
            "kv_bytes_per_layer": per_layer,
        }
        self.records.append(record)
        return record

    def summary(self) -> str:
        """One line: KV bytes and peak memory at the last step."""
        if not self.records:
            return f"{self.run.label}: no steps recorded"
        last = self.records[-1]
        return (f"{self.run.label}: KV cache {format_bytes(last['kv_bytes'])} at {last['tokens']:,} tokens, "
                f"peak memory {format_bytes(max(r['peak_bytes'] for r in self.records))}")

    def save(self, path: str | Path, option: str = "--memory-report") -> None:
        """Write the records: ``.json`` (with metadata) or ``.csv`` (a column per layer).
        ``option``: the flag that named ``path``, for the one-line error if it cannot be written."""
        save_memory_run(self.run, path, option)


def report_format(path: str | Path, option: str = "--memory-report") -> str:
    """"json" or "csv" from the file name; a one-line UserError otherwise (check before a long run)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".csv"):
        raise UserError(f"cannot tell the format of {option} {path}; name it .json or .csv")
    return suffix[1:]


def save_memory_run(run: MemoryRun, path: str | Path, option: str = "--memory-report") -> None:
    """Write ``run`` atomically: JSON (records plus metadata: command, date, machine, ``run.info``)
    or CSV (one row per step, a column per layer)."""
    from mlxkv.report import atomic_output, run_metadata, write_json

    path = Path(path)
    if report_format(path, option) == "json":
        write_json(path, run.records, run_metadata(label=run.label, **run.info), option)
        return
    n_layers = max((len(r["kv_bytes_per_layer"]) for r in run.records), default=0)
    header = [*RECORD_FIELDS, *(f"kv_bytes_layer_{i}" for i in range(n_layers))]
    with atomic_output(path, option) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in run.records:
            writer.writerow([r[k] for k in RECORD_FIELDS] + list(r["kv_bytes_per_layer"]))


def load_memory_run(path: str | Path) -> MemoryRun:
    """Read back a report written by ``save`` (to plot several runs on one figure)."""
    path = Path(path)
    kind = report_format(path)
    if not path.is_file():
        raise UserError(f"no such memory report: {path}")
    try:
        if kind == "json":
            payload = json.loads(path.read_text(encoding="utf-8"))
            info = dict(payload.get("metadata") or {})
            return MemoryRun(str(info.pop("label", path.stem)), list(payload["rows"]), info)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        records = []
        for row in rows:
            record: dict[str, Any] = {k: int(row[k]) for k in RECORD_FIELDS if k != "elapsed_s"}
            record["elapsed_s"] = float(row["elapsed_s"])
            record["kv_bytes_per_layer"] = [int(v) for k, v in row.items() if k.startswith("kv_bytes_layer_")]
            records.append(record)
        return MemoryRun(path.stem, records)
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a memory report written by mlxkv ({type(e).__name__}: {e})") from None
