"""Numbers typed by clients and operators, bounded before they are converted.

Python refuses `int()` of more than 4,300 digits (ValueError), `float()` turns a long digit string
into infinity and SQLite integers stop at 2**63: a number is checked against its bounds as text
first, so that any length of input gets the caller's own clear error.
"""

from __future__ import annotations

import math


def whole_number(text: str, high: int) -> int | None:
    """ASCII digits (leading zeros allowed) as an int no larger than `high`; None otherwise."""
    if not (text.isascii() and text.isdigit()):
        return None
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(high)):
        return None
    value = int(significant)
    return value if value <= high else None


def finite_between(value: object, low: float, high: float) -> bool:
    """A real number (not bool, NaN or infinite) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return low <= value <= high


def shown(text: str, limit: int = 24) -> str:
    """A value for an error message, shortened: a 5,000-digit input is named, not echoed."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
