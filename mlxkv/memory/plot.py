"""Memory over tokens, one colour per run: KV bytes, and MLX's active and peak memory.

Several runs on one figure compare KV configurations (fp16 vs 4-bit vs a sink window);
needs matplotlib (``pip install 'mlxkv[plot]'``), else a one-line hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlxkv.errors import UserError
from mlxkv.memory.tracker import MemoryRun

from mlxkv.units import MB


def plot_memory_runs(runs: Sequence[MemoryRun], path: str | Path, title: str | None = None,
                     option: str = "--memory-plot") -> Path:
    """Draw ``runs`` to ``path`` (.png, .pdf, .svg): KV bytes on the left; MLX's active
    (solid) and peak (dotted) memory on the right, weights included. Returns the path.
    ``option``: the flag that named ``path``, for the one-line error if it cannot be written."""
    from mlxkv.report import require_pyplot, save_figure

    runs = [run for run in runs if run.records]
    if not runs:
        raise UserError("nothing to plot: no memory was recorded")
    plt = require_pyplot()
    fig, (ax_kv, ax_all) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        tokens = [r["tokens"] for r in run.records]
        ax_kv.plot(tokens, [r["kv_bytes"] / MB for r in run.records], "-", color=color, label=run.label)
        ax_all.plot(tokens, [r["active_bytes"] / MB for r in run.records], "-", color=color,
                    label=f"{run.label}: active")
        ax_all.plot(tokens, [r["peak_bytes"] / MB for r in run.records], ":", color=color,
                    label=f"{run.label}: peak")
    ax_kv.set(title="KV cache", xlabel="tokens", ylabel="MB")
    ax_kv.set_ylim(bottom=0)
    ax_all.set(title="MLX memory: active (solid), peak (dotted)", xlabel="tokens", ylabel="MB")
    for ax in (ax_kv, ax_all):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path, option=option)
    return Path(path)
