"""Generic argument checks: each raises ``TypeError``/``ValueError`` with a message that
names the argument, what it got and what was expected.

Cheap Python-level checks only (no tensor reads, so no host-device synchronisation): they may
run on every optimizer update.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_number_in", "check_schedule_value"]


def _interval(low: float, high: float, include_high: bool) -> str:
    if high == math.inf:
        return f">= {low:g}"
    return f"in [{low:g}, {high:g}{']' if include_high else ')'}"


def check_number_in(
    name: str, value: Any, low: float, high: float = math.inf, *, include_high: bool = False
) -> float:
    """``value`` must be a finite real number (not a ``bool``) with ``low <= value < high``
    (``<= high`` with ``include_high``); returns it as a ``float``."""
    expected = f"a finite number {_interval(low, high, include_high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    number = float(value)
    below_high = number <= high if include_high else number < high
    if not (math.isfinite(number) and low <= number and below_high):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def check_schedule_value(name: str, step: int, value: Any) -> float:
    """What a schedule returned at ``step`` must be a finite real number >= 0 (a Python
    number, not a tensor); returns it as a ``float``. Always ``ValueError``: the schedule is
    the argument, its output the bad value."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) < 0
    ):
        raise ValueError(
            f"{name}: the schedule returned {value!r} at step {step}; expected a finite number "
            ">= 0 (a Python int or float)"
        )
    return float(value)
