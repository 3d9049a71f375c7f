"""Thin helpers over ``optree`` for parameter pytrees (dicts of tensors, nested containers).

Every function here is pure: it returns new tensors and never writes into its inputs.
optree sorts dict keys when flattening; never zip its leaves with ``torch.utils._pytree``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import optree
import torch

__all__ = [
    "add",
    "axpy",
    "detach",
    "global_norm",
    "leaves",
    "map",
    "scale",
    "select_names",
    "sub",
    "zeros_like",
]

PyTree = Any


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` applied leaf by leaf over ``tree`` and the trees in ``rest`` (same structure)."""
    return optree.tree_map(fn, tree, *rest)


def leaves(tree: PyTree) -> list[torch.Tensor]:
    """The leaves of ``tree`` in optree's (sorted-key) order."""
    return optree.tree_leaves(tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf by leaf."""
    return map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return map(torch.sub, a, b)


def scale(alpha: float | torch.Tensor, tree: PyTree) -> PyTree:
    """``alpha * tree`` leaf by leaf."""
    return map(lambda x: alpha * x, tree)


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf (the BLAS name)."""
    return map(lambda xi, yi: alpha * xi + yi, x, y)


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the shapes, dtypes and devices of ``tree``."""
    return map(torch.zeros_like, tree)


def detach(tree: PyTree) -> PyTree:
    """Every leaf detached from autograd and from enclosing ``torch.func`` transforms."""
    return map(torch.Tensor.detach, tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The 2-norm of all leaves taken together, a 0-d tensor: ``sqrt(sum_i ||x_i||^2)``."""
    squares = [torch.sum(x * x) for x in leaves(tree)]
    if not squares:
        raise ValueError("global_norm: the tree has no leaves")
    return torch.sqrt(torch.stack(squares).sum())


def select_names(
    params: dict[str, torch.Tensor], which: Collection[str] | Callable[[str], bool] | None
) -> frozenset[str]:
    """The names in the flat dict ``params`` chosen by ``which``.

    ``which`` is ``None`` (every name), a collection of names, or a predicate on the name
    (e.g. ``lambda name: name.startswith("head.")``). Unknown names raise ``KeyError``; an
    empty selection raises ``ValueError``.
    """
    if which is None:
        chosen = frozenset(params)
    elif callable(which):
        chosen = frozenset(name for name in params if which(name))
    else:
        if isinstance(which, str):
            raise TypeError(f"expected a collection of parameter names, got the string {which!r}")
        chosen = frozenset(which)
        unknown = sorted(chosen - params.keys())
        if unknown:
            raise KeyError(
                f"unknown parameter names {unknown}; the parameters are {sorted(params)}"
            )
    if not chosen:
        raise ValueError(f"the selection chose no parameter; the parameters are {sorted(params)}")
    return chosen
