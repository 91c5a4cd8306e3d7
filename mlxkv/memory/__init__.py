"""Unified memory: what a KV cache will take (the planner) and what it took (the tracker).

    from mlxkv.memory import MemoryTracker, recommend_config, kv_bytes_per_token
"""

from mlxkv.memory.machine_memory import DeviceMemory, device_memory
from mlxkv.memory.layout import LayerSpec, ModelLayout, layout_from_config, layout_from_model
from mlxkv.memory.cache_bytes import kv_bytes_per_token, predict_kv_bytes, predict_layer_bytes, stored_bytes_per_token
from mlxkv.memory.peak import PeakPrediction, predict_peak
from mlxkv.memory.planner import PlanRow, candidate_configs, max_context, plan, recommend, recommend_config
from mlxkv.memory.held import KVHeld, kv_held, layer_kv_bytes
from mlxkv.memory.plot import plot_memory_runs
from mlxkv.memory.tracker import (
    MemoryRun, MemoryTracker, load_memory_run, model_weights_bytes,
    report_format, save_memory_run,
)
from mlxkv.units import format_bytes, parse_bytes

__all__ = [
    "DeviceMemory", "KVHeld", "kv_held", "LayerSpec", "MemoryRun", "MemoryTracker", "ModelLayout",
    "PeakPrediction", "PlanRow", "candidate_configs", "device_memory", "format_bytes", "kv_bytes_per_token",
    "layer_kv_bytes", "layout_from_config", "layout_from_model", "load_memory_run", "max_context",
    "model_weights_bytes", "parse_bytes", "plan", "plot_memory_runs", "predict_kv_bytes", "predict_peak",
    "predict_layer_bytes", "recommend", "recommend_config", "report_format", "save_memory_run", "stored_bytes_per_token",
]
