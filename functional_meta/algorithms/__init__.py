"""The algorithms, one module each, and the registry that names them.

Each module builds an :class:`~functional_meta.steps.Algorithm` record with a constructor
of the same shape, ``constructor(model, loss, inner, *, batching, **options)``, and keeps
its named functions for a user's own loop (``maml_step``, ``metasgd_step``, ...).
:data:`REGISTRY` maps the command line's names to those constructors; adding an algorithm
is one module plus one line here (docs/extending.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from functional_meta.algorithms.anil import anil
from functional_meta.algorithms.imaml import imaml
from functional_meta.algorithms.maml import fomaml, maml
from functional_meta.algorithms.mamlpp import mamlpp
from functional_meta.algorithms.metasgd import metasgd
from functional_meta.algorithms.protonets import protonets
from functional_meta.algorithms.reptile import reptile
from functional_meta.batching import Batching
from functional_meta.inner import Apply, InnerLoop, LossFn
from functional_meta.steps import Algorithm

__all__ = [
    "REGISTRY",
    "anil",
    "build",
    "fomaml",
    "imaml",
    "maml",
    "mamlpp",
    "metasgd",
    "options",
    "protonets",
    "register",
    "reptile",
]

Constructor = Callable[..., Algorithm]

REGISTRY: dict[str, Constructor] = {
    "maml": maml,
    "fomaml": fomaml,
    "anil": anil,
    "metasgd": metasgd,
    "mamlpp": mamlpp,
    "reptile": reptile,
    "imaml": imaml,
    "protonets": protonets,
}


def register(name: str, constructor: Constructor) -> Constructor:
    """Add ``constructor`` to :data:`REGISTRY` under ``name`` (the command line, the class
    API and :func:`build` then know it) and return it. It must take ``(model, loss, inner,
    *, batching, **options)`` and return an :class:`~functional_meta.steps.Algorithm`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier such as 'imaml', got {name!r}")
    if name in REGISTRY and REGISTRY[name] is not constructor:
        raise ValueError(f"name: {name!r} is already registered (to {REGISTRY[name].__name__})")
    parameters = list(inspect.signature(constructor).parameters.values())[:3]
    if [p.name for p in parameters] != ["model", "loss", "inner"] or "batching" not in (
        inspect.signature(constructor).parameters
    ):
        raise TypeError(
            f"constructor: expected the shape constructor(model, loss, inner, *, batching, "
            f"**options), got {constructor.__name__}{inspect.signature(constructor)}"
        )
    REGISTRY[name] = constructor
    return constructor


def options(name: str) -> dict[str, Any]:
    """The algorithm-specific options of ``name`` and their defaults (its constructor's
    keyword-only parameters other than ``batching``)."""
    parameters = inspect.signature(_constructor(name)).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "batching"
    }


def _constructor(name: str) -> Constructor:
    if name not in REGISTRY:
        raise ValueError(f"algorithm: expected one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def build(
    name: str,
    model: Apply,
    loss: LossFn,
    inner: InnerLoop | None = None,
    *,
    batching: Batching = Batching(),
    **given: Any,
) -> Algorithm:
    """The record of the registered algorithm ``name``. ``inner=None`` takes the
    algorithm's default inner loop; ``given`` are its own options (see :func:`options`):
    an option it does not have is a ``ValueError`` naming the ones it has."""
    constructor = _constructor(name)
    unknown = sorted(set(given) - options(name).keys())
    if unknown:
        raise ValueError(
            f"{name}: no option {', '.join(unknown)}; its options are {sorted(options(name))}"
        )
    if inner is None:
        return constructor(model, loss, batching=batching, **given)
    return constructor(model, loss, inner, batching=batching, **given)
