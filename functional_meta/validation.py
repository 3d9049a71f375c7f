"""Generic validation shared by every layer: numbers, counts and finiteness.

Nothing here knows about models, tasks or algorithms (those checks live in
``functional_meta.checks``), so the optimizers and the pytree layer can use it without
pulling in the rest of the library. The number checks read no tensor (no host-device
synchronisation): they may run on every optimizer update. Each check raises ``TypeError``/``ValueError`` with a
message that names the argument, what it got and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from functional_meta import tree

__all__ = [
    "NonFiniteError",
    "all_finite",
    "check_count",
    "check_number_in",
    "check_positive_number",
    "check_schedule_value",
    "finite_flag",
]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or updated parameter was NaN or infinite; nothing was updated."""


def check_positive_number(name: str, value: Any) -> float:
    """``value`` must be a positive finite ``int`` or ``float``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a positive finite number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_count(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> Any:
    """``value`` must be an integer ``>= minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "None or " if optional else ""
        raise ValueError(f"{name}: expected {allowed}an integer >= {minimum}, got {value!r}")
    return value


def finite_flag(*trees: Any) -> torch.Tensor | None:
    """A 0-d bool tensor: whether every tensor leaf of every tree is free of NaN and
    infinity (``None`` when no leaf can hold one). Reads nothing back to the host: callers
    fold it into the one synchronisation they make anyway.

    One fused kernel over all leaves (``torch._foreach_norm`` with ``ord=inf``, the largest
    ``|x|``, which is NaN or infinite exactly when some entry is) instead of a check per
    tensor. Integer and empty leaves are finite by definition and skipped."""
    leaves = [
        leaf
        for t in trees
        for leaf in tree.leaves(t)
        if (leaf.is_floating_point() or leaf.is_complex()) and leaf.numel()
    ]
    if not leaves:
        return None
    with torch.no_grad():
        norms = torch._foreach_norm(leaves, math.inf)
        return torch.isfinite(torch.stack(norms) if len(norms) > 1 else norms[0]).all()


def all_finite(*trees: Any) -> bool:
    """Whether every tensor leaf of every tree is free of NaN and infinity (one host sync;
    see :func:`finite_flag`)."""
    flag = finite_flag(*trees)
    return flag is None or bool(flag)


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
