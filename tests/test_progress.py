"""Progress without a terminal (nohup, CI): whole lines at most once per interval, and the
last state at the end. A fake clock stands in for time so the throttle itself is tested."""

from __future__ import annotations

import io

from mlxkv.report import LineProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_one_line_per_interval_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=2_000_000, desc="eval kld", unit="tok", interval=10, file=out, clock=clock)
    with bar:
        for t, n in ((1, 500_000), (5, 100_000), (9, 100_000), (12, 300_000), (13, 1_000_000)):
            clock.now = t
            bar.set_postfix_str(f"step at {t}")
            bar.update(n)
    shown = lines(out)
    assert shown == [
        "eval kld: 500,000/2,000,000 tok (25%), 1s elapsed, ~3s left, step at 1",
        "eval kld: 1,000,000/2,000,000 tok (50%), 12s elapsed, ~12s left, step at 12",
        "eval kld: 2,000,000/2,000,000 tok (100%), 13s elapsed, step at 13",
    ]


def test_nothing_more_at_the_end_when_the_last_line_is_current():
    out = io.StringIO()
    with LineProgress(total=1, desc="bench", unit="run", interval=60, file=out) as bar:
        bar.update(1)
    assert len(lines(out)) == 1 and lines(out)[0].startswith("bench: 1/1 run (100%), ")


def test_iterating_counts_the_items_and_closes():
    out = io.StringIO()
    items = list(LineProgress(["a", "b", "c"], desc="memory", unit="run", interval=3600, file=out))
    assert items == ["a", "b", "c"]
    first, last = lines(out)
    assert first.startswith("memory: 1/3 run (33%), ") and last.startswith("memory: 3/3 run (100%), ")


def test_durations_read_at_a_glance():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=4, desc="x", interval=0, file=out, clock=clock)
    clock.now = 3725
    bar.update(1)
    assert lines(out) == ["x: 1/4 it (25%), 1h02m elapsed, ~3h06m left"]
