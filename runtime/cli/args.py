"""Argument checks shared by the CLI subcommands: one SpecError naming the flag, never a traceback."""
from __future__ import annotations

import math

from specmoe.planner.errors import SpecError


def int_arg(text, flag: str, minimum: int) -> int:
    """An integer >= minimum from a CLI string."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise SpecError(flag, f"{text!r} is not a number", f"give an integer >= {minimum}") from None
    if not math.isfinite(v) or v != int(v):
        raise SpecError(flag, f"{text!r} is not an integer", f"give an integer >= {minimum}")
    if v < minimum:
        raise SpecError(flag, f"must be >= {minimum}, got {text}", f"give an integer >= {minimum}")
    return int(v)


def pos_float_arg(text, flag: str) -> float | None:
    """A positive finite float from a CLI string, or None when the flag was not given."""
    if text is None:
        return None
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise SpecError(flag, f"{text!r} is not a number", "give a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise SpecError(flag, f"must be positive, got {text}", "give a positive number")
    return v
