"""Generic validation shared by every layer: numbers, counts and finiteness.

Nothing here knows about models, tasks or algorithms (those checks live in
``functional_meta.checks``), so the optimizers and the pytree layer can use it without
pulling in the rest of the library. Each check raises ``TypeError``/``ValueError`` with a
message that names the argument, what it got and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functional_meta import tree

__all__ = [
    "NonFiniteError",
    "all_finite",
    "check_count",
    "check_positive_number",
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


def all_finite(*trees: Any) -> bool:
    """Whether every tensor leaf of every tree is free of NaN and infinity (one host sync)."""
    flags = [torch.isfinite(leaf).all() for t in trees for leaf in tree.leaves(t)]
    return not flags or bool(torch.stack(flags).all())
