"""Byte sizes as people write them ("8GB", "512 MiB") and as tables show them.

One unit system everywhere: memory is counted in powers of 1024, as RAM is sold and as
macOS reports it, and labelled KB, MB, GB: "8GB" means 8 x 1024^3 bytes, the same as "8GiB",
and tables print 4 GiB as "4.00 GB". Text needs a unit ("8GB", "100B"): a bare "8" is
refused, since it almost always means 8 GB and reading it as 8 bytes would plan nothing.
A number passed from Python (an int) is bytes.
"""

from __future__ import annotations

import re

from mlxkv.errors import UserError

KB, MB, GB = 1024, 1024**2, 1024**3
"""What mlxkv's labels mean, in tables, plots and messages alike."""
UNITS_NOTE = "MB = 1024^2 bytes, GB = 1024^3 (as RAM is sold)"
"""The one sentence that says so, for --help and table notes."""

SIZE_HELP = "powers of 1024, a unit required: 8GB = 8GiB, 512MB"
"""How a size flag reads its value, for --help."""

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "memory size") -> int:
    """``"8GB"`` -> 8589934592 (an int is bytes). Raises a one-line UserError for anything else:
    "8 parsecs", or "8" without a unit."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise UserError(
                f"cannot read the {what} {str(text)!r}; write a number and a unit, e.g. 8GB, 512MB or 16GiB"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
        if not unit:
            raise UserError(f"the {what} {str(text)!r} has no unit; write e.g. {match.group(1)}GB "
                            "(powers of 1024), or end it in B for bytes")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UserError(f"the {what} must be more than 0 bytes, got {text!r}")
    return size


def format_bytes(n: float | None) -> str:
    """A short human size: '512 B', '36.0 KB', '4.00 GB' (powers of 1024)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_TOKENS = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kKmM]?)\s*$")


def parse_tokens(text: str | int, what: str = "token count", minimum: int = 1) -> int:
    """``"32768"``, ``"32k"`` (x1024), ``"32,768"`` or ``"1m"`` -> tokens: one rule for every
    flag and field that takes a number of tokens. A one-line UserError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _TOKENS.match(str(text).replace(",", "").replace("_", ""))
        if not match:
            raise UserError(f"cannot read the {what} {str(text)!r}; write a number of tokens such as 4096 or 4k")
        scale = {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
        number = float(match.group(1)) * scale
        if number != int(number):
            raise UserError(f"the {what} {text!r} is not a whole number of tokens")
        value = int(number)
    if value < minimum:
        raise UserError(f"the {what} must be at least {minimum}, got {text!r}")
    return value
