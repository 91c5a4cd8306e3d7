"""mlxkv bench in one process and over N ranks (mlx.launch), alternated, side by side.

    python scripts/bench_distributed.py --ranks 3 --out bench-distributed.md        # loopback
    python scripts/bench_distributed.py --hostfile hosts.json --backend jaccl      # several Macs

Each round runs ``mlxkv bench`` alone, then under ``mlx.launch`` (rounds alternate, so a machine
that drifts moves both alike); a row reports the median over rounds of each run's medians,
the per-round ratio of the sharded run to the single one (median over rounds), and every
rank's peak memory and KV bytes. On one machine over loopback the ranks share its cores: the
numbers measure correctness and overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlxkv.distributed import free_loopback_ports

MIB = 2**20


def bench(args: argparse.Namespace, out: Path, ranks: int) -> dict:
    """One ``mlxkv bench`` run, alone (ranks 1) or under mlx.launch; its JSON."""
    command = [sys.executable, "-m", "mlxkv", "bench", "--configs", args.configs, "--contexts", args.contexts,
               "--gen-tokens", str(args.gen_tokens), "--trials", str(args.trials), "--json", str(out)]
    if args.model:
        command += ["--model", args.model]
    if ranks > 1:
        launcher = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", args.backend]
        if args.hostfile:
            launcher += ["--hostfile", args.hostfile]
        else:
            launcher += ["-n", str(ranks), "--hosts", "127.0.0.1", "--starting-port", str(free_loopback_ports(ranks))]
        command = [*launcher, "--", *command]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if not out.exists():  # mlx.launch exits 0 whatever its ranks do
        raise SystemExit(f"the run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def combine(rounds: list[tuple[dict, dict]]) -> list[dict]:
    """Rows of (config, context): medians over rounds and per-round ratios sharded / single."""
    rows = []
    for i, first in enumerate(rounds[0][1]["rows"]):
        single = [one["rows"][i] for one, _ in rounds]
        sharded = [many["rows"][i] for _, many in rounds]
        row = {"config": first["config"], "context": first["context"]}
        for metric in ("prefill_tps", "decode_tps"):
            row[f"{metric}_1"] = statistics.median(r[metric] for r in single)
            row[f"{metric}_n"] = statistics.median(r[metric] for r in sharded)
            row[f"{metric}_ratio"] = statistics.median(m[metric] / s[metric] for s, m in zip(single, sharded))
        row["peak_mib_1"] = max(r["peak_memory_bytes"] for r in single) / MIB
        row["kv_mib_1"] = max(r["kv_bytes"] for r in single) / MIB
        row["peak_mib_n"] = [max(vals) / MIB for vals in zip(*(r["peak_memory_bytes_per_rank"] for r in sharded))]
        row["kv_mib_n"] = [max(vals) / MIB for vals in zip(*(r["kv_bytes_per_rank"] for r in sharded))]
        rows.append(row)
    return rows


def render(rows: list[dict], meta: dict, ranks: int, command: str) -> str:
    m = meta["machine"]
    head = ("| config | context | decode tok/s, 1 | decode tok/s, {n} | x | prefill tok/s, 1 | prefill tok/s, {n} "
            "| x | peak MiB, 1 | peak MiB per rank, {n} | KV MiB, 1 | KV MiB per rank, {n} |").format(n=ranks)
    lines = [
        f"Command: `{command}`  ",
        f"Model: {meta['model']}; {meta['prompt']}; {meta['gen_tokens']} greedy decode steps; "
        f"{meta['trials']} trials per run  ",
        f"Machine: {m['machine']} {m['chip']}, {m['os']}, {m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}  ",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['context']} | {r['decode_tps_1']:.3g} | {r['decode_tps_n']:.3g} | "
            f"{r['decode_tps_ratio']:.3f} | {r['prefill_tps_1']:.3g} | {r['prefill_tps_n']:.3g} | "
            f"{r['prefill_tps_ratio']:.3f} | {r['peak_mib_1']:.0f} | {' / '.join(f'{v:.0f}' for v in r['peak_mib_n'])} "
            f"| {r['kv_mib_1']:.3g} | {' / '.join(f'{v:.3g}' for v in r['kv_mib_n'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=3, help="ranks on loopback (default 3; ignored with --hostfile)")
    p.add_argument("--hostfile", help="mlx.launch hostfile for several machines (its host count gives the ranks)")
    p.add_argument("--backend", default="ring", help="mlx.launch backend: ring (default) or jaccl")
    p.add_argument("--model", help="model for mlxkv bench (default: the bundled SmolLM2-135M)")
    p.add_argument("--configs", default="fp16,q8,q4-kivi-rot")
    p.add_argument("--contexts", default="1024")
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the single and sharded runs (default 2)")
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args()
    ranks = args.ranks
    if args.hostfile:  # mlx.launch's hostfile: a list of hosts, or {"hosts": [...], "backend": ...}
        hosts = json.loads(Path(args.hostfile).read_text())
        ranks = len(hosts["hosts"] if isinstance(hosts, dict) else hosts)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = []
        for i in range(args.rounds):
            one = bench(args, Path(tmp, f"one-{i}.json"), 1)
            many = bench(args, Path(tmp, f"many-{i}.json"), ranks)
            rounds.append((one, many))
    command = "python " + " ".join(sys.argv)
    text = render(combine(rounds), rounds[0][0]["metadata"], ranks, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
