"""What an optimizer is given, checked: the transformation itself, and its state against
the gradients.

:func:`check_transformation` accepts anything of the optax shape (``init`` and ``update``)
and refuses a ``torch.optim`` optimizer (which keeps its state on the tensors it updates, in
place) or an optimizer factory that was not called, saying what to do instead. The state
checks compare Python objects only (no tensor is read, so no device synchronisation); they
are what ``functional_meta.optim``'s updates run before touching ``opt_state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch

__all__ = ["check_state", "check_state_keys", "check_transformation"]


def check_transformation(optimizer: Any, name: str, torch_optim_advice: str) -> None:
    """``optimizer`` (the argument ``name``) must have the optax shape: ``init(params)`` and
    ``update(grads, state, params=...)``. A ``torch.optim`` optimizer is a ``TypeError``
    ending with ``torch_optim_advice`` (how to do the same thing functionally); so is a
    function without those attributes (e.g. ``optim.adam`` not called)."""
    if isinstance(optimizer, torch.optim.Optimizer) or (
        isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)
    ):
        shown = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
        raise TypeError(
            f"{name}: {shown} is a torch.optim optimizer, which updates its own tensors in "
            f"place; {torch_optim_advice}"
        )
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        hint = ""
        if callable(optimizer):
            hint = " (a function: call it to build the transformation, e.g. optim.adam(1e-3))"
        raise TypeError(
            f"{name}: expected a gradient transformation with init(params) and "
            "update(grads, state, params=...) (functional_meta.optim.adam(1e-3), or TorchOpt's), "
            f"got {type(optimizer).__name__}{hint}"
        )


def _path(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def check_state_keys(name: str, state: Any, keys: frozenset[str], what: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{name}: opt_state: expected the dict made by {name}'s init, got {type(state).__name__}"
        )
    if state.keys() != keys:
        raise ValueError(
            f"{name}: opt_state has keys {sorted(state)}, expected {sorted(keys)} ({what}): "
            f"it was not made by this optimizer's init (another optimizer's state?)"
        )


def check_state(
    name: str, state: Any, keys: frozenset[str], moments: tuple[str, ...], grads: Any
) -> tuple[list[torch.Tensor], Any, dict[str, list[torch.Tensor]]]:
    """``state`` must be what ``init`` made for parameters shaped like ``grads``: exactly
    ``keys``, a 0-d integer ``count``, and each tree in ``moments`` with the gradients'
    structure and, leaf by leaf, the gradient's shape (a 0-d moment would broadcast silently).
    Python-level comparisons only (no tensor is read). Returns the gradients' leaves and
    treespec and each moment's leaves, so that the update need not flatten them again."""
    check_state_keys(name, state, keys, "the update count and the moments")
    count = state["count"]
    if not (
        (isinstance(count, int) and not isinstance(count, bool))
        or (
            isinstance(count, torch.Tensor)
            and count.dim() == 0
            and not (count.is_floating_point() or count.is_complex() or count.dtype == torch.bool)
        )
    ):
        shown = tuple(count.shape) if isinstance(count, torch.Tensor) else type(count).__name__
        raise ValueError(f"{name}: opt_state['count']: expected a 0-d integer tensor, got {shown}")
    leaves, spec = optree.tree_flatten(grads)
    shapes = [g.shape for g in leaves]
    flat = {}
    for key in moments:
        moment, moment_spec = optree.tree_flatten(state[key])
        flat[key] = moment
        if moment_spec != spec:
            expected = {_path(p) for p in optree.tree_paths(grads)}
            found = {_path(p) for p in optree.tree_paths(state[key])}
            differences = [
                f"{label} {', '.join(sorted(paths))}"
                for label, paths in (("lacks", expected - found), ("has extra", found - expected))
                if paths
            ] or ["has the same entries in other containers"]
            raise ValueError(
                f"{name}: opt_state[{key!r}] does not have the gradients' structure: it "
                f"{' and '.join(differences)} (state made for other parameters?)"
            )
        try:  # the fast path: one list comparison
            if [m.shape for m in moment] == shapes:
                continue
        except AttributeError:
            pass
        for index, (m, g) in enumerate(zip(moment, leaves, strict=True)):
            if isinstance(m, torch.Tensor) and m.shape == g.shape:
                continue
            where = f"opt_state[{key!r}]{_path(optree.tree_paths(grads)[index])}"
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{name}: {where}: expected a tensor, got {type(m).__name__}")
            raise ValueError(
                f"{name}: {where} has shape {tuple(m.shape)}; the gradient's is "
                f"{tuple(g.shape)} (state made for other parameters?)"
            )
    return leaves, spec, flat
