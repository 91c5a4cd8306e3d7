"""A picture of an eval kld run: quality lost (KL divergence) against bits spent per element."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mlxkv.report import require_pyplot, save_figure


def plot_kld(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One labelled point per config: KL divergence (log scale) against bits per element;
    mlx-lm's caches as hollow squares. Configs with KLD 0 (the full-precision ones) have
    no place on a log scale and are named in a note instead."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    exact = [r["config"] for r in rows if not r["kld"] > 0]
    shown = [r for r in rows if r["kld"] > 0 and r.get("bits_per_element") is not None]
    for baseline, style in ((False, {"marker": "o", "color": "tab:blue", "label": "mlxkv"}),
                            (True, {"marker": "s", "color": "tab:orange", "facecolors": "none",
                                    "label": "mlx-lm QuantizedKVCache"})):
        points = [r for r in shown if r["config"].startswith("mlxlm-") == baseline]
        if not points:
            continue
        if "facecolors" in style:
            style = {**style, "edgecolors": style.pop("color")}
        ax.scatter([r["bits_per_element"] for r in points], [r["kld"] for r in points], s=40, **style)
        for r in points:
            # Configs with the same bits (q3 and k4v2) would print on top of each other.
            twins = [o for o in shown if round(o["bits_per_element"], 1) == round(r["bits_per_element"], 1)]
            below = len(twins) > 1 and r["kld"] == min(o["kld"] for o in twins)
            ax.annotate(r["config"], (r["bits_per_element"], r["kld"]), textcoords="offset points",
                        xytext=(5, -11 if below else 4), fontsize="small")
    if shown:
        ax.set_yscale("log")
    ax.set_xlabel("bits per element (filled cache bytes, scales and residual included)")
    ax.set_ylabel("mean KL divergence from the full-precision cache (nats)")
    ax.grid(True, which="both", alpha=0.3)
    if any(r["config"].startswith("mlxlm-") for r in shown):
        ax.legend(fontsize="small")
    ax.margins(x=0.12, y=0.15)
    if exact:
        title = f"{title}\n(KLD 0, not shown: {', '.join(exact)})" if title else f"KLD 0, not shown: {', '.join(exact)}"
    if title:
        ax.set_title(title, fontsize="medium")
    save_figure(fig, path)


def plot_layers(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One bar per layer: the KL divergence of quantizing that layer alone (log scale),
    the layers the bit map raises in a second colour."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(rows) + 2), 4))
    bits = [r["bits"] or 16 for r in rows]  # 0 = full precision
    low = min(bits)
    colours = ["tab:orange" if b != low else "tab:blue" for b in bits]
    ax.bar([r["layer"] for r in rows], [max(r["kld"], 1e-12) for r in rows], color=colours)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL divergence, this layer alone quantized (nats)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue", label=f"kept at {low} bits")]
    if any(c == "tab:orange" for c in colours):
        handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:orange", label=f"raised to {max(bits)} bits"))
    ax.legend(handles=handles, fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    save_figure(fig, path)
