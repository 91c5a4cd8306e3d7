"""Serving benchmark: mlxkv's server on several KV configs beside mlx_lm.server, same weights, same run.

Every server is started once and stays up (idle servers cost nothing but memory); each
repeat visits every (clients, server) pair in a rotating order, so a machine that drifts
during the run affects all alike. Ratios are taken within a repeat and their medians
reported, as the shared machine demands.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxkv.bench.serve_load import run_round
from mlxkv.bench.serve_servers import RunningServer, ServerSpec

MLXKV_CONFIGS = {"mlxkv fp16": ["--kv-config", "fp16"], "mlxkv q8": ["--kv-config", "q8"],
                 "mlxkv --kv-bits 4": ["--kv-bits", "4"]}
MLX_LM_SERVERS = {"mlx_lm.server": [], "mlx_lm.server --kv-bits 4": ["--kv-bits", "4"]}
TARGET = "mlxkv --kv-bits 4"
REFERENCE = "mlx_lm.server --kv-bits 4"


@dataclass(frozen=True)
class Row:
    server: str
    clients: int
    repeat: int
    aggregate_tps: float
    ttft_s: float
    stream_tps: float
    tokens: int
    wall_s: float


def run_sweep(specs: Sequence[ServerSpec], clients: Sequence[int], repeats: int, max_tokens: int, logs: Path,
              say: Callable[[str], None] = print) -> tuple[list[Row], dict[str, str], list[str]]:
    """Rows for every (repeat, clients, server), each server's answer to one warm-up prompt,
    and the rounds that failed (reported, not fatal)."""
    rows: list[Row] = []
    warm: dict[str, str] = {}
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        servers = []
        for spec in specs:
            server = RunningServer(spec, logs / f"{_slug(spec.label)}.log")
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_ready()
            warm[server.spec.label] = _warm_up(server)
            say(f"{server.spec.label}: ready on port {server.port}")
        for repeat in range(repeats):
            for n in clients:
                order = servers[repeat % len(servers):] + servers[:repeat % len(servers)]
                for server in order:
                    try:
                        result = run_round(server.url, server.spec.model, n, max_tokens, round_=repeat * 100 + n)
                    except RuntimeError as e:
                        failures.append(f"repeat {repeat + 1}, {n} clients, {server.spec.label}: {e}")
                        say(failures[-1])
                        continue
                    row = Row(server.spec.label, n, repeat, result.aggregate_tps, result.ttft, result.stream_tps,
                              result.tokens, result.wall_s)
                    rows.append(row)
                    say(f"repeat {repeat + 1}/{repeats}, {n:2d} clients, {row.server:28s} "
                        f"{row.aggregate_tps:6.1f} tok/s aggregate, ttft {row.ttft_s:5.2f} s, "
                        f"{row.stream_tps:5.1f} tok/s per stream")
    return rows, warm, failures


def _warm_up(server: RunningServer) -> str:
    """One short greedy answer: compiles what needs compiling, and shows both servers run the same weights."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model=server.spec.model, temperature=0.0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    return reply.choices[0].message.content


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per (server, clients): medians over repeats, and the ratios against the same repeat's
    single client and the reference server."""
    by = {(r.server, r.clients, r.repeat): r for r in rows}
    out = []
    for server, clients in dict.fromkeys((r.server, r.clients) for r in rows):
        mine = [r for r in rows if (r.server, r.clients) == (server, clients)]
        solo = [by.get((server, 1, r.repeat)) for r in mine]
        ref = [by.get((REFERENCE, clients, r.repeat)) for r in mine]
        out.append({
            "server": server, "clients": clients, "repeats": len(mine),
            "aggregate_tps": statistics.median(r.aggregate_tps for r in mine),
            "aggregate_min": min(r.aggregate_tps for r in mine), "aggregate_max": max(r.aggregate_tps for r in mine),
            "ttft_s": statistics.median(r.ttft_s for r in mine),
            "stream_tps": statistics.median(r.stream_tps for r in mine),
            "vs_one_client": _paired(mine, solo),
            "vs_reference": _paired(mine, ref),
        })
    return out


def _paired(rows: Sequence[Row], refs: Sequence[Row | None]) -> float | None:
    pairs = [(r.aggregate_tps, s.aggregate_tps) for r, s in zip(rows, refs) if s is not None]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def targets(summary: Sequence[dict[str, Any]], clients: int = 8) -> dict[str, Any]:
    """Issue 16's throughput targets at ``clients`` clients: >= 3x one client, >= 2x the reference."""
    row = next((s for s in summary if s["server"] == TARGET and s["clients"] == clients), None)
    if row is None:
        return {}
    return {"clients": clients, "vs_one_client": row["vs_one_client"], "vs_one_client_target": 3.0,
            "vs_reference": row["vs_reference"], "vs_reference_target": 2.0}


def plot(summary: Sequence[dict[str, Any]], capacity: Sequence[dict[str, Any]], path: str, title: str) -> None:
    from mlxkv.report import require_pyplot, save_figure

    plt = require_pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    servers = list(dict.fromkeys(s["server"] for s in summary))
    for server in servers:
        mine = [s for s in summary if s["server"] == server]
        xs = [s["clients"] for s in mine]
        style = "-" if server.startswith("mlxkv") else "--"
        for ax, key in zip(axes[:3], ("aggregate_tps", "ttft_s", "stream_tps")):
            ax.plot(xs, [s[key] for s in mine], style, marker="o", label=server)
    for ax, label in zip(axes[:3], ("aggregate tokens/s", "time to first token (s, median)",
                                    "tokens/s per stream (median)")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({s["clients"] for s in summary}), [str(c) for c in sorted({s["clients"] for s in summary})])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if capacity:
        ax = axes[3]
        configs = list(dict.fromkeys(c["config"] for c in capacity))
        for offset, (dtype, color, text) in enumerate((("float16", "tab:blue", "16-bit weights (a Mac)"),
                                                       ("float32", "tab:gray", "float32 weights (here)"))):
            mine = {c["config"]: c["sessions"] for c in capacity if c["dtype"] == dtype}
            xs = [i + (offset - 0.5) * 0.4 for i in range(len(configs))]
            bars = ax.bar(xs, [mine.get(c, 0) for c in configs], width=0.4, color=color, label=text)
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(configs)), configs, fontsize=7)
        ax.set_ylabel("concurrent sessions admitted")
        ax.legend(fontsize=8)
        first = capacity[0]
        ax.set_title(f"{first['tokens']:,} tokens each, {first['budget'] / 2**30:.0f} GiB KV budget", fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def capacity_rows(model_dir: Path, tokens: int, budget: int, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Sessions each config admits, with the weights as run here (float32) and as on a Mac (float16)."""
    import mlxkv
    from mlxkv.bench.serve_capacity import capacities
    from mlxkv.config import KVConfig, parse_spec
    from mlxkv.config.request import KVRequest

    rows = []
    for dtype in ("float16", "float32"):
        model, tokenizer = mlxkv.load(str(model_dir), dtype=dtype)
        configs = {"fp16": KVConfig(), "q8": KVConfig.from_name("q8"), "--kv-bits 4": KVRequest(bits=4).resolve(model)}
        configs.update({label: parse_spec(spec) for label, spec in (extra or {}).items()})
        rows += [asdict(c) for c in capacities(model, tokenizer, configs, tokens, budget, dtype)]
        del model
    for row in rows:
        full = next(r for r in rows if r["config"] == "fp16" and r["dtype"] == row["dtype"])
        row["sessions_vs_fp16"] = row["sessions"] / full["sessions"] if full["sessions"] else None
        row["bytes_vs_fp16"] = full["reserved_per_session"] / row["reserved_per_session"]
    return rows
