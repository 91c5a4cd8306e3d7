"""One exception type for mistakes a user can fix; the CLI prints it as one line."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input with a message that says what to do. The CLI prints it without a traceback."""


def at_least(value: int, minimum: int, name: str) -> int:
    """``value`` when it is a whole number >= ``minimum``; else a UserError naming ``name``
    (a parameter, or the flag the user typed): the one range rule for counts."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}")
    return value
