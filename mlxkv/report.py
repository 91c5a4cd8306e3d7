"""Output shared by ``mlxkv bench`` and ``mlxkv eval``: terminal and markdown tables,
JSON files that record the machine, progress bars, and matplotlib with a one-line hint.

Rows are plain dicts (one per measurement); columns are chosen by the caller, so the
same rows feed the table, the markdown and the JSON.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
    """Fail before a long run, not after it, when an output file cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: directory {parent} is not writable; choose another path")


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


def write_json(path: str | os.PathLike, rows: Sequence[dict], metadata: dict[str, Any] | None = None) -> None:
    """Write ``{"metadata": ..., "rows": [...]}``; the metadata defaults to ``run_metadata()``."""
    payload = {"metadata": metadata if metadata is not None else run_metadata(), "rows": list(rows)}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.write("\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose another --json path") from e


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / mlx scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", disable: bool | None = None):
    """A tqdm progress bar on stderr; hidden when stderr is not a terminal unless forced.

    ``disable=None`` lets tqdm decide (off when stderr is not a TTY)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                leave=False, dynamic_ncols=True)


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
    """Write a text file (a markdown report); an unwritable path is a one-line ``UserError``
    naming the command-line ``option`` to change."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose another {option} path") from e


def save_figure(fig: Any, path: str | os.PathLike, option: str = "--plot", dpi: int = 120) -> None:
    """Lay out, save and close a matplotlib figure; a path matplotlib cannot write (missing
    folder, unknown extension) is a one-line ``UserError`` naming ``option``."""
    plt = require_pyplot()
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write the plot {path}: {e}; choose another {option} path (.png, .pdf or .svg)") from None
    finally:
        plt.close(fig)
