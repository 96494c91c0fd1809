"""Limits a user sets as numbers (pixel, upload and memory budgets): one reader, one message for a bad value."""

from __future__ import annotations

import math
import os

from unetseg.errors import UnetsegError


def positive_number(source: str, value: str | float | None, default: float, unit: str) -> float:
    """``value`` as a positive finite number, or ``default`` when it is None or empty.

    Args:
        source: what the value is called in the message (an environment variable, an argument).
        unit: what it counts, for the message (``"pixels"``, ``"megabytes"``).

    Raises:
        UnetsegError: one line, ``SOURCE='VALUE' is not a positive number of UNIT; set it to e.g. DEFAULT``,
            for text that is not a number, inf, nan, zero or a negative number.
    """
    if value is None or value == "":
        return float(default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:  # inf would overflow int(); nan passes every comparison
        raise UnetsegError(f"{source}={value!r} is not a positive number of {unit}; set it to e.g. {default:g}")
    return number


def env_positive_number(name: str, default: float, unit: str) -> float:
    """:func:`positive_number` of the environment variable ``name``."""
    return positive_number(name, os.environ.get(name), default, unit)
