"""A picture of an eval kld run: quality lost (KL divergence) against bits spent per element."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mlxkv.report import require_pyplot, save_figure

LABEL_OFFSETS = ((6, 3), (6, -10), (-6, 3), (-6, -10), (0, 9), (0, -16), (14, 12), (14, -19), (-14, 12),
                 (-14, -19), (24, 0), (-24, 0), (20, 22), (20, -29), (-20, 22), (-20, -29), (36, 12), (36, -12),
                 (-36, 12), (-36, -12), (30, 34), (30, -34), (-30, 34), (-30, -34))
"""Where a point's label may go (points from the point), tried in order until it overlaps
neither a placed label nor a point; labels set apart get a leader line."""


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both bits per element and KLD, by bits."""
    front: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["bits_per_element"], r["kld"])):
        if not front or r["kld"] < front[-1]["kld"]:
            front.append(r)
    return front


def _annotate(ax: Any, label: str, x: float, y: float, dx: float, dy: float) -> Any:
    far = abs(dx) > 10 or abs(dy) > 12
    text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize="small", va="center",
                       ha="left" if dx > 0 else "right" if dx < 0 else "center",
                       arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35"} if far else None)
    text.set_in_layout(False)  # placed after the layout; a later tight_layout must not move the points
    return text


def _words_box(annotation: Any, renderer: Any) -> Any:
    """Where an annotation's text sits on the canvas, without its leader line."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _place_labels(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Label each point where the text overlaps no earlier label and no point (the first
    fit in LABEL_OFFSETS; the first offset when nothing fits)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for _, x, y in points]
    taken = [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5) for px, py in dots]
    for label, x, y in points:
        box = None
        for dx, dy in LABEL_OFFSETS:
            text = _annotate(ax, label, x, y, dx, dy)
            candidate = _words_box(text, renderer)
            inside = frame.x0 <= candidate.x0 and candidate.x1 <= frame.x1 and frame.y0 <= candidate.y0 \
                and candidate.y1 <= frame.y1
            if inside and not any(candidate.overlaps(other) for other in taken):
                box = candidate
                break
            text.remove()
        if box is None:
            box = _words_box(_annotate(ax, label, x, y, *LABEL_OFFSETS[0]), renderer)
        taken.append(box)


def plot_kld(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One labelled point per config: KL divergence (log scale) against bits per element;
    mlx-lm's caches as hollow squares, mlxkv's best trade-offs joined by a dashed line.
    Configs with KLD 0 (the full-precision ones) have no place on a log scale and are
    named in a note instead."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    exact = [r["config"] for r in rows if not r["kld"] > 0]
    shown = [r for r in rows if r["kld"] > 0 and r.get("bits_per_element") is not None]
    ours = [r for r in shown if not r["config"].startswith("mlxlm-")]
    theirs = [r for r in shown if r["config"].startswith("mlxlm-")]
    if ours:
        ax.scatter([r["bits_per_element"] for r in ours], [r["kld"] for r in ours], s=40, marker="o",
                   color="tab:blue", label="mlxkv", zorder=3)
        front = pareto_front(ours)
        if len(front) > 1:
            ax.plot([r["bits_per_element"] for r in front], [r["kld"] for r in front], "--", color="tab:blue",
                    alpha=0.5, label="mlxkv: best KLD for the bits", zorder=2)
    if theirs:
        ax.scatter([r["bits_per_element"] for r in theirs], [r["kld"] for r in theirs], s=40, marker="s",
                   facecolors="none", edgecolors="tab:orange", label="mlx-lm QuantizedKVCache", zorder=3)
    if shown:
        ax.set_yscale("log")
    ax.set_xlabel("bits per element (filled cache bytes, scales and residual included)")
    ax.set_ylabel("mean KL divergence from the full-precision cache (nats)")
    ax.grid(True, which="both", alpha=0.3)
    if theirs or len(ours) > 1:
        ax.legend(fontsize="small")
    ax.margins(x=0.12, y=0.15)
    if exact:
        title = f"{title}\n(KLD 0, not shown: {', '.join(exact)})" if title else f"KLD 0, not shown: {', '.join(exact)}"
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.canvas.draw()  # fixes the axes' place and limits, so label boxes can be measured
    # the most important labels first: the front, then by quality
    front_labels = {r["config"] for r in pareto_front(ours)} if ours else set()
    order = sorted(shown, key=lambda r: (r["config"] not in front_labels, r["kld"]))
    _place_labels(fig, ax, [(r["config"], r["bits_per_element"], r["kld"]) for r in order])
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


def plot_kld_context(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One line per config: KL divergence (log scale) against the context length (log 2
    scale) at which its window was scored, from ``evaluate_windows`` rows; each point
    labelled with the config's bits per element there."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    exact = [c for c in configs if not all(r["kld"] > 0 for r in rows if r["config"] == c)]
    for config in (c for c in configs if c not in exact):
        points = sorted((r for r in rows if r["config"] == config), key=lambda r: r["context"])
        xs, ys = [r["context"] for r in points], [r["kld"] for r in points]
        line, = ax.plot(xs, ys, "o-", label=config)
        for r in points:
            if r.get("bits_per_element") is not None:
                ax.annotate(f"{r['bits_per_element']:.2f}b", (r["context"], r["kld"]), textcoords="offset points",
                            xytext=(5, 3), fontsize="x-small", color=line.get_color())
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens before the scored window's end)")
    ax.set_ylabel("mean KL divergence from the full-precision cache (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.margins(x=0.15)
    if exact:
        title = f"{title}\n(KLD 0, not shown: {', '.join(exact)})" if title else f"KLD 0, not shown: {', '.join(exact)}"
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    save_figure(fig, path)
