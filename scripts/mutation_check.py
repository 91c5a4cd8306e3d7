#!/usr/bin/env python3
"""Do the tests catch small bugs? Apply each mutation below to the source, run the tests,
restore the source, and report whether the mutation was killed (a test failed) or survived.

Usage (from the repository root, with the project's virtualenv):
    .venv/bin/python scripts/mutation_check.py                 # every mutation
    .venv/bin/python scripts/mutation_check.py --only h2o-tie  # names containing a word
    .venv/bin/python scripts/mutation_check.py --tests tests/test_cache_properties.py tests/test_h2o.py

A mutation is a list of exact text replacements in one file. When the code it targets is
rewritten, its text is no longer found: the report says "text not found" for it (and the
script exits non-zero); update the ``old`` text to the new code's version of the same bug.
The source is restored after each run, also on Ctrl-C; never commit a mutated file.
Exit status: 0 when every mutation was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/test_cache_properties.py", "tests/test_cache_attention.py", "tests/test_h2o.py"]
"""The tests that compare the caches with the documented reference (tests/kv_reference.py)."""


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old, new): each old text must occur exactly once
    why: str


MUTATIONS = [
    # -- the four of issue 13 --------------------------------------------------------------
    Mutation(
        "h2o-tie-break-newest-one-at-a-time", "mlxkv/caches/policy.py",
        (("oldest_lowest = mx.argmin(mx.where(self.scores == lowest, self.positions, mx.iinfo(mx.int32).max))",
          "oldest_lowest = mx.argmax(mx.where(self.scores == lowest, self.positions, -1))"),),
        "a decode step evicts the newest of the lowest-scored heavy hitters, not the oldest",
    ),
    Mutation(
        "h2o-tie-break-newest-in-a-chunk", "mlxkv/caches/policy.py",
        (("heap = [(slot_scores[s], positions[s], s) for s in range(filled)]",
          "heap = [(slot_scores[s], -positions[s], s) for s in range(filled)]"),
         ("heapq.heappush(heap, (score, start + row, slot))", "heapq.heappush(heap, (score, -(start + row), slot))"),
         ("heapq.heapreplace(heap, (score, start + row, slot))", "heapq.heapreplace(heap, (score, -(start + row), slot))")),
        "tokens placed together evict the newest of the lowest-scored heavy hitters",
    ),
    Mutation(
        "sink-window-can-trim-one-late", "mlxkv/caches/policy.py",
        (("return flushed - self.sinks <= self.ring", "return flushed - self.sinks <= self.ring + 1"),),
        "a window that evicted one token still says it can be trimmed",
    ),
    Mutation(
        "sink-window-can-trim-one-early", "mlxkv/caches/policy.py",
        (("return flushed - self.sinks <= self.ring", "return flushed - self.sinks < self.ring"),),
        "a full window that evicted nothing refuses to be trimmed",
    ),
    Mutation(
        "h2o-can-trim-one-late", "mlxkv/caches/policy.py",
        (("return flushed - self.sinks <= self.capacity", "return flushed - self.sinks <= self.capacity + 1"),),
        "H2O that dropped one token still says it can be trimmed",
    ),
    Mutation(
        "h2o-can-trim-one-early", "mlxkv/caches/policy.py",
        (("return flushed - self.sinks <= self.capacity", "return flushed - self.sinks < self.capacity"),),
        "H2O with its heavy slots just full refuses to be trimmed",
    ),
    Mutation(
        "trim-keeps-the-sink-tier", "mlxkv/caches/cache.py",
        (("        if self.sink_keys is not None and plan.keep_sinks < self.sink_keys.shape[2]:\n"
          "            self.sink_keys = self.sink_keys[..., : plan.keep_sinks, :] if plan.keep_sinks else None\n"
          "            self.sink_values = self.sink_values[..., : plan.keep_sinks, :] if plan.keep_sinks else None\n",
          ""),),
        "trimming below the sinks leaves the trimmed sinks in the 16-bit sink tier",
    ),
    # -- more of the same kind ---------------------------------------------------------------
    Mutation(
        "window-sees-one-token-too-far", "mlxkv/caches/policy.py",
        (("return (k <= q) & ((k < self.sinks) | (q - k < self.window))",
          "return (k <= q) & ((k < self.sinks) | (q - k <= self.window))"),),
        "a window query sees window + 1 positions back",
    ),
    Mutation(
        "per-channel-groups-count-from-zero", "mlxkv/caches/book.py",
        (("return flushed if flushed <= sinks else flushed - (flushed - sinks) % self.unit",
          "return flushed if flushed <= sinks else flushed - flushed % self.unit"),),
        "per-channel key groups start at token 0 instead of the first token after the sinks",
    ),
    Mutation(
        "residual-one-token-short", "mlxkv/caches/book.py",
        (("target = max(flushed, end - self.residual)", "target = max(flushed, end - self.residual + 1)"),),
        "one token fewer than `residual` stays in 16-bit",
    ),
    Mutation(
        "h2o-flushes-unscored-tokens", "mlxkv/caches/book.py",
        (("            target = min(target, first)\n", "            pass\n"),),
        "H2O lets a chunk's tokens compete before any step scored them",
    ),
    Mutation(
        "load-forgets-recent-scores", "mlxkv/caches/policy.py",
        (('self.recent_scores = state["recent_scores"]', 'self.recent_scores = mx.zeros_like(state["recent_scores"])'),),
        "a loaded H2O cache forgets the attention its recent tier gathered",
    ),
]


def run_tests(tests: list[str], timeout: float) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and seconds taken."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    return ("passed" if done.returncode == 0 else "failed"), time.perf_counter() - start


def apply(mutation: Mutation, text: str) -> str | None:
    """The mutated text, or None when an edit's old text is not found exactly once."""
    for old, new in mutation.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    return text


def check(mutation: Mutation, tests: list[str], timeout: float) -> str:
    path = ROOT / mutation.path
    original = path.read_text()
    mutated = apply(mutation, original)
    if mutated is None:
        return "text not found"
    try:
        path.write_text(mutated)
        outcome, seconds = run_tests(tests, timeout)
    finally:
        path.write_text(original)
    verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed (timeout)"}[outcome]
    return f"{verdict} ({seconds:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files to run against each mutation")
    parser.add_argument("--only", default="", help="run only the mutations whose name contains this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    args = parser.parse_args()

    outcome, seconds = run_tests(args.tests, args.timeout)
    print(f"unmutated: tests {outcome} ({seconds:.0f} s)", flush=True)
    if outcome != "passed":
        print("the tests must pass on the unmutated code first")
        return 1
    results = {}
    for mutation in (m for m in MUTATIONS if args.only in m.name):
        results[mutation.name] = check(mutation, args.tests, args.timeout)
        print(f"{mutation.name:<40} {results[mutation.name]:<22} {mutation.path}: {mutation.why}", flush=True)
    killed = sum(r.startswith("killed") for r in results.values())
    print(f"{killed} of {len(results)} mutations killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
