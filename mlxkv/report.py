"""Output shared by ``mlxkv bench`` and ``mlxkv eval``: terminal and markdown tables,
JSON files that record the machine, progress bars, and matplotlib with a one-line hint.

Rows are plain dicts (one per measurement); columns are chosen by the caller, so the
same rows feed the table, the markdown and the JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from mlxkv.errors import UserError


def format_value(value: Any, digits: int = 4) -> str:
    """A cell: floats to ``digits`` significant digits (scientific when tiny), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and abs(value) < 10 ** -(digits - 1):
            return f"{value:.{max(digits - 2, 1)}e}"
        if abs(value) >= 10**digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _cells(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None,
           digits: int) -> tuple[list[str], list[list[str]]]:
    head = list(headers) if headers is not None else list(columns)
    if len(head) != len(columns):
        raise ValueError("headers and columns differ in length")
    body = [[format_value(row.get(c), digits) for c in columns] for row in rows]
    return head, body


def _is_numeric_column(rows: Sequence[dict], column: str) -> bool:
    values = [row.get(column) for row in rows if row.get(column) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def text_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
               digits: int = 4) -> str:
    """A fixed-width table for the terminal; numeric columns right-aligned."""
    head, body = _cells(rows, columns, headers, digits)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    right = [_is_numeric_column(rows, c) for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in body)])


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; numeric columns right-aligned."""
    head, body = _cells(rows, columns, headers, digits)
    align = ["---:" if _is_numeric_column(rows, c) else "---" for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(head), "|" + "|".join(align) + "|", *(line(r) for r in body)])


def check_output_path(path: str | os.PathLike | None, option: str) -> None:
    """Fail before a long run, not after it, when the file ``option`` names cannot be written:
    a directory, a missing folder, or a folder that takes no new file (read-only, /proc). The
    probe is the write itself: a temporary file created and removed beside the target."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: directory {parent} does not exist; create it or choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write files in {parent} ({e.strerror or e}); "
                        "choose another path") from None


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """Like ``check_output_path`` for a directory that will be created (with its parents)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{option} {path} exists and is not a directory; choose another path")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is not a directory; choose another path")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".mlxkv-check-").cleanup()
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {existing} ({e.strerror or e}); "
                        "choose another path") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, option: str, binary: bool = False) -> Iterator[IO]:
    """An open temporary file beside ``path`` that replaces ``path`` only once it is complete:
    a failed or interrupted write never destroys a file the user saved. Errors are one-line
    ``UserError`` naming the command-line ``option``."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose another {option} path") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose another {option} path") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_metadata(command: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """What makes a result reproducible: the command, the date (UTC) and ``machine_info()``."""
    from mlxkv.device import machine_info

    argv = list(command) if command is not None else ["mlxkv", *sys.argv[1:]]
    return {
        "command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **extra,
    }


def write_json(path: str | os.PathLike, rows: Sequence[dict], metadata: dict[str, Any] | None = None,
               option: str = "--json") -> None:
    """Write ``{"metadata": ..., "rows": [...]}`` atomically; the metadata defaults to
    ``run_metadata()``. A failure is one line naming ``option``, the flag that gave the path."""
    payload = {"metadata": metadata if metadata is not None else run_metadata(), "rows": list(rows)}
    text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    with atomic_output(path, option) as f:
        f.write(text)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / mlx scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", disable: bool | None = None, interval: float = 60.0):
    """A tqdm progress bar on stderr when it is a terminal; otherwise (a log file, nohup,
    CI) a plain line every ``interval`` seconds, so a long run's log still says how far it
    got and how long is left. ``disable=True`` shows nothing; ``False`` forces the bar."""
    if disable is None:
        from mlxkv.distributed import is_main

        if not is_main():  # under mlx.launch rank 0 reports for all
            disable = True
        elif not _is_terminal(sys.stderr):
            return LineProgress(iterable, total=total, desc=desc, unit=unit, interval=interval)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=bool(disable),
                leave=False, dynamic_ncols=True)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """The part of tqdm's interface the commands use (``update``, ``set_postfix_str``, a
    context manager, iteration), written as whole lines: ``bench: 3/7 run (43%), 12m05s
    elapsed, ~16m left, q8 @ 32768``. The first line comes at the first update, then one per
    ``interval`` seconds, and one at the end."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                 unit: str = "it", interval: float = 60.0, file: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # as tqdm does
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.interval, self.file = interval, file
        self.n, self.postfix = 0, ""
        self._start = self._clock()
        self._last: float | None = None  # when the last line was written
        self._shown: float | None = None  # the count it showed

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self._clock()
        if self._last is None or now - self._last >= self.interval:
            self._write(now)

    def close(self) -> None:
        if self._last is not None and self._shown != self.n:
            self._write(self._clock())

    def line(self, now: float) -> str:
        elapsed = now - self._start
        done = f"{self.n:,.0f}/{self.total:,} {self.unit}" if self.total else f"{self.n:,.0f} {self.unit}"
        parts = [f"{self.desc}: {done}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"~{_duration(elapsed * (self.total - self.n) / self.n)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        self._last, self._shown = now, self.n
        print(self.line(now), file=self.file or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """12m05s, 1h02m, 45s: a time a person reads at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def require_pyplot():
    """matplotlib's pyplot with a headless backend, or a one-line ``UserError`` saying how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("plotting needs matplotlib: pip install 'mlxkv[plot]' (or pip install matplotlib)") from e
    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_text(path: str | os.PathLike, text: str, option: str = "--markdown") -> None:
    """Write a text file (a markdown report) atomically; an unwritable path is a one-line
    ``UserError`` naming the command-line ``option`` to change."""
    with atomic_output(path, option) as f:
        f.write(text)


def plot_formats() -> tuple[str, ...]:
    """File extensions matplotlib can write (png, pdf, svg, ...)."""
    require_pyplot()
    from matplotlib.figure import Figure

    return tuple(Figure().canvas.get_supported_filetypes())


def check_plot_path(path: str | os.PathLike | None, option: str = "--plot") -> None:
    """``check_output_path`` plus: matplotlib is installed and knows the file's extension."""
    if path is None:
        return
    check_output_path(path, option)
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in plot_formats():
        raise UserError(f"{option} {path}: cannot tell the image format from the name; end it in .png, .pdf or .svg")


def save_figure(fig: Any, path: str | os.PathLike, option: str = "--plot", dpi: int = 120) -> None:
    """Lay out, save (atomically) and close a matplotlib figure; a path matplotlib cannot
    write (missing folder, unknown extension) is a one-line ``UserError`` naming ``option``."""
    plt = require_pyplot()
    suffix = Path(path).suffix.lower().lstrip(".")
    try:
        if suffix not in plot_formats():
            raise UserError(f"{option} {path}: cannot tell the image format from the name; "
                            "end it in .png, .pdf or .svg")
        fig.tight_layout()
        with atomic_output(path, option, binary=True) as f:
            fig.savefig(f, dpi=dpi, format=suffix)
    finally:
        plt.close(fig)
