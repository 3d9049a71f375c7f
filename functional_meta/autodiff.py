"""Which engine differentiates: ``torch.func`` inside its transforms, ``torch.autograd`` outside.

Both compute the same derivatives. Inside a ``torch.func`` transform (``vmap``, an outer
``grad``) only ``torch.func.grad`` composes. Outside any transform (the task loop,
forward-only adaptation) ``torch.autograd`` computes them with less overhead: under
``torch.func`` every operator passes through a wrapper per transform level, which costs
about 20% of a conv net's second-order meta-gradient on the CPU (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import grad_and_value as func_grad_and_value

__all__ = ["grad_and_value", "transforms_active", "under_vmap"]


def _levels() -> list[Any] | None:
    """The active ``torch.func`` transform levels, or ``None`` when they cannot be read (then
    callers take the path that is right under any transform)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return list(torch._C._functorch.get_interpreter_stack() or ())
    except AttributeError:  # a torch without this private hook
        return None


def transforms_active() -> bool:
    """Whether this code runs inside any ``torch.func`` transform (or under
    ``torch.compile``, or where that cannot be told)."""
    levels = _levels()
    return levels is None or bool(levels)


def under_vmap() -> bool:
    """Whether this code runs inside ``torch.func.vmap`` at any level (or under
    ``torch.compile``, or where that cannot be told)."""
    levels = _levels()
    vmap = torch._C._functorch.TransformType.Vmap
    return levels is None or any(level.key() == vmap for level in levels)


def grad_and_value(
    fn: Callable[[Any], tuple[torch.Tensor, Any]], params: Any, *, create_graph: bool = False
) -> tuple[Any, tuple[torch.Tensor, Any]]:
    """``(grads, (value, aux))`` of ``fn(params) -> (value [], aux)`` with respect to every
    tensor of the pytree ``params``, as ``torch.func.grad_and_value(fn, has_aux=True)``.

    Inside a ``torch.func`` transform it is exactly that (``create_graph`` is implied: an
    outer transform differentiates through the result). Outside, ``torch.autograd.grad``
    computes it. Tensors that already carry an autograd graph (they require grad and grad
    mode is on) are differentiated in place, and ``create_graph=True`` keeps the gradient
    differentiable for a second-order outer derivative; other tensors are differentiated
    through fresh leaves, so the result carries no graph. Unused tensors get zero
    gradients, as under ``torch.func``.
    """
    if transforms_active():
        return func_grad_and_value(fn, has_aux=True)(params)
    leaves, spec = optree.tree_flatten(params)
    tracked = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    inputs = [
        leaf if tracked and leaf.requires_grad else leaf.detach().requires_grad_()
        for leaf in leaves
    ]
    with torch.enable_grad():
        value, aux = fn(optree.tree_unflatten(spec, inputs))
        found = torch.autograd.grad(
            value, inputs, create_graph=create_graph and tracked, allow_unused=True
        )
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found, strict=True)]
    return optree.tree_unflatten(spec, grads), (value if tracked else value.detach(), aux)
