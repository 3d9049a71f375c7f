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
    "differences",
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


def _shapes(tree: PyTree) -> dict[str, Any]:
    paths, values, _ = optree.tree_flatten_with_path(tree)
    return {
        "/".join(str(entry) for entry in path): tuple(v.shape)
        if isinstance(v, torch.Tensor)
        else type(v).__name__
        for path, v in zip(paths, values, strict=True)
    }


def differences(
    expected: PyTree, given: PyTree, names: tuple[str, str] = ("expected", "given")
) -> list[str]:
    """How the structure of ``given`` differs from ``expected`` (called ``names`` in the
    lines): one line per leaf path (``params/head.weight``) that only one of them has, or
    whose shape (tensors) or type (other leaves) differs; empty when they agree."""
    want, have = _shapes(expected), _shapes(given)
    lines = [f"{path} only in the {names[0]}" for path in sorted(want.keys() - have.keys())]
    lines += [f"{path} only in the {names[1]}" for path in sorted(have.keys() - want.keys())]
    lines += [
        f"{path} is {have[path]} in the {names[1]}, {want[path]} in the {names[0]}"
        for path in sorted(want.keys() & have.keys())
        if want[path] != have[path]
    ]
    return lines
