"""Hand-written ``torch.autograd`` references and small fixtures shared by the tests.

The references use the original ``nn.Module`` (native ``BatchNorm`` in training mode, i.e.
batch statistics), ``torch.autograd.grad`` with ``create_graph=True`` and a Python loop over
tasks: an implementation independent of the library's vmap, torch.func and primitive batch
norm, to hold the library against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from functional_meta import TaskBatch
from functional_meta.models import conv4


def tiny_mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module(
        "features", nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    )
    model.add_module("head", nn.Linear(16, 1))
    return model.to(dtype)


def tiny_conv4(ways: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return conv4(ways, hidden=8, image_size=16).to(dtype)


def regression_tasks(num_tasks=4, support=5, query=7, dtype=torch.float32, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype) * 4 + 1
    phase = torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype) * 3

    def draw(n):
        x = torch.rand(num_tasks, n, 1, generator=g, dtype=dtype) * 10 - 5
        return x, amplitude * torch.sin(x - phase)

    return TaskBatch(*draw(support), *draw(query))


def image_tasks(
    num_tasks=3, ways=3, shots=1, queries=2, size=16, dtype=torch.float32, seed=2
) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def draw(per_class):
        x = torch.rand(num_tasks, ways * per_class, 1, size, size, generator=g, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1).contiguous()
        return x, y

    return TaskBatch(*draw(shots), *draw(queries))


def call(module: nn.Module, params: dict[str, torch.Tensor], x):
    """``module(x)`` at ``params``; a tuple ``x`` is positional inputs, a dict keyword ones."""
    if isinstance(x, dict):
        return functional_call(module, params, (), x)
    return functional_call(module, params, x if isinstance(x, tuple) else (x,))


def reference_maml_grad(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    tasks: TaskBatch,
    loss_fn=F.mse_loss,
    inner_lr: float | dict[str, torch.Tensor] = 0.1,
    inner_steps: int = 1,
    first_order: bool = False,
    step_weights: torch.Tensor | None = None,
    adapted: set[str] | None = None,
    per_step_lr: bool = False,
):
    """``∇_θ (1/T) Σ_i L_query,i(θ'_i)`` by autograd, one task at a time.

    Returns ``(grads, lr_grads)``; ``lr_grads`` is ``None`` unless ``inner_lr`` is a dict of
    tensors, in which case the rates are differentiated too (Meta-SGD, MAML++ LSLR).
    """
    module = module.train()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    learn_lr = isinstance(inner_lr, dict)
    lr_leaves = (
        {k: v.detach().clone().requires_grad_() for k, v in inner_lr.items()} if learn_lr else None
    )
    names = list(leaves)
    adapted = set(names) if adapted is None else set(adapted)
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    lr_total = {k: torch.zeros_like(v) for k, v in lr_leaves.items()} if learn_lr else None
    num_tasks = len(tasks)
    for i in range(num_tasks):
        sx, sy, qx, qy = tasks[i]
        fast = dict(leaves)
        query_losses = []
        for t in range(inner_steps):
            loss = loss_fn(call(module, fast, sx), sy)
            moving = [k for k in names if k in adapted]
            grads = torch.autograd.grad(
                loss, [fast[k] for k in moving], create_graph=not first_order
            )
            for k, g in zip(moving, grads, strict=True):
                rate = (lr_leaves[k][t] if per_step_lr else lr_leaves[k]) if learn_lr else inner_lr
                fast[k] = fast[k] - rate * g
            query_losses.append(loss_fn(call(module, fast, qx), qy))
        if step_weights is None:
            objective = query_losses[-1]
        else:
            objective = sum(w * q for w, q in zip(step_weights, query_losses, strict=True))
        wrt = list(leaves.values()) + (list(lr_leaves.values()) if learn_lr else [])
        grads = torch.autograd.grad(objective / num_tasks, wrt, allow_unused=True)
        for k, g in zip(names, grads[: len(names)], strict=True):
            total[k] = total[k] + g
        if learn_lr:
            for k, g in zip(lr_leaves, grads[len(names) :], strict=True):
                if g is not None:
                    lr_total[k] = lr_total[k] + g
    return total, lr_total
