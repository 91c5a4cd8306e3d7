"""A picture of a bench run: tokens/s and memory against context, one line per config."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mlxkv.report import require_pyplot, save_figure

from mlxkv.units import MB

PANELS = (
    ("decode_tps", "decode tokens/s", 1.0),
    ("prefill_tps", "prefill tokens/s", 1.0),
    ("decode_peak_memory_bytes", "peak memory while decoding (MB)", MB),
    ("kv_bytes", "KV cache (MB)", MB),
)


def _family(config: str) -> str:
    """Configs that share a colour: ours and mlx-lm's at the same bits."""
    return config.removeprefix("mlxlm-")


def plot_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Write a 2x2 figure (decode and prefill tokens/s with min-max bars, decode peak memory,
    KV bytes) against context; mlx-lm baselines dashed, in the colour of our config with
    the same bits."""
    plt = require_pyplot()
    # Ours first, then mlx-lm's: dashed baselines drawn on top stay visible where lines coincide.
    configs = sorted(dict.fromkeys(r["config"] for r in rows), key=lambda c: c.startswith("mlxlm-"))
    families = list(dict.fromkeys(_family(c) for c in configs))
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (metric, label, scale) in zip(axes.flat, PANELS):
        for config in configs:
            points = sorted((r for r in rows if r["config"] == config), key=lambda r: r["context"])
            x = [r["context"] for r in points]
            y = [r[metric] / scale for r in points]
            baseline = config.startswith("mlxlm-")
            style = {
                "color": colours[_family(config)],
                "linestyle": "--" if baseline else "-",
                "marker": "s" if baseline else "o",
                "fillstyle": "none" if baseline else "full",
                "label": config,
            }
            if f"{metric}_min" in points[0]:
                low = [(r[metric] - r[f"{metric}_min"]) / scale for r in points]
                high = [(r[f"{metric}_max"] - r[metric]) / scale for r in points]
                ax.errorbar(x, y, yerr=[low, high], capsize=3, **style)
            else:
                ax.plot(x, y, **style)
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    contexts = sorted({r["context"] for r in rows})
    for ax in axes[1]:
        ax.set_xlabel("context (tokens)")
        ax.set_xticks(contexts, [str(c) for c in contexts])
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    save_figure(fig, path)
