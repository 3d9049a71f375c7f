"""One meta-update per call: the gradient of the batched task loss plus the optimizer update.

Every ``*_step`` is pure: it takes the meta-parameters and optimizer state and returns new
ones with the metrics, and never modifies its inputs. Every ``*_grad`` returns the
meta-gradient and metrics for users who bring their own optimizer (``torch.optim`` via
``functional_meta.optim.assign_grads``).

Metrics are plain Python numbers: ``loss`` (mean meta-loss over tasks), ``query_loss``,
``accuracy`` (classification), ``support_losses`` (list over inner steps, mean over tasks)
and ``query_losses`` (multi-step loss). A non-finite meta-loss or meta-gradient raises
:class:`functional_meta.checks.NonFiniteError` and nothing is updated.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from typing import Any

import torch

from functional_meta.batching import Strategy, check_strategy, mean_value_and_grad
from functional_meta.checks import (
    check_finite,
    check_inner_config,
    check_model_fits_tasks,
    check_tasks,
)
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import LearningRate, LossFn, Params
from functional_meta.losses import maml_loss
from functional_meta.optim import GradientTransformation, apply_updates

__all__ = ["maml_grad", "maml_step", "meta_gradient", "meta_update", "summarize"]

Metrics = dict[str, float | list[float]]
TaskLoss = Callable[[Any, Task], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def summarize(losses: torch.Tensor, aux: dict[str, torch.Tensor]) -> Metrics:
    """Mean over the task axis of the per-task ``losses [T]`` and every ``aux`` entry
    (``[T]`` becomes a float, ``[T, n]`` a list of ``n`` floats)."""
    metrics: Metrics = {"loss": losses.mean().item()}
    for key, values in aux.items():
        metrics[key] = values.float().mean(dim=0).tolist()
    return metrics


def meta_gradient(
    task_loss: TaskLoss,
    meta_params: Any,
    tasks: TaskBatch,
    *,
    strategy: Strategy = "vmap",
    chunk_size: int | None = None,
) -> tuple[Any, Metrics]:
    """``∇ (1/T) Σ_i L_i(meta_params)`` over the tasks, checked finite, with the metrics."""
    grads, losses, aux = mean_value_and_grad(
        task_loss, meta_params, tasks, strategy=strategy, chunk_size=chunk_size
    )
    check_finite(losses, grads)
    return grads, summarize(losses, aux)


def meta_update(
    grads: Any, meta_params: Any, opt_state: Any, optimizer: GradientTransformation
) -> tuple[Any, Any]:
    """The optimizer's update applied: ``(new meta_params, new opt_state)``."""
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            "optimizer: expected a functional_meta.optim transformation (e.g. optim.adam(1e-3)), "
            f"got {type(optimizer).__name__}; for torch.optim use the *_grad functions"
        )
    updates, opt_state = optimizer.update(grads, opt_state, meta_params)
    return apply_updates(meta_params, updates), opt_state


def maml_grad(
    params: Params,
    tasks: TaskBatch,
    *,
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    buffers: Params,
    loss: LossFn,
    inner_lr: LearningRate,
    inner_steps: int = 1,
    first_order: bool = False,
    step_weights: torch.Tensor | None = None,
    adapted: Collection[str] | Callable[[str], bool] | None = None,
    inner_clip: float | None = None,
    strategy: Strategy = "vmap",
    chunk_size: int | None = None,
) -> tuple[Params, Metrics]:
    """The MAML meta-gradient of a meta-batch (Finn et al. 2017, Algorithm 2, line 10).

    ``∇_θ (1/T) Σ_i L_query,i(adapt_i(θ))`` with ``adapt`` the inner loop of
    ``inner_steps`` SGD steps at ``inner_lr`` on each task's support set. ``first_order``
    drops the second-order term (FOMAML); ``step_weights [inner_steps]`` turns on MAML++'s
    multi-step loss; ``adapted`` (names or a predicate) restricts adaptation to some
    parameters (ANIL); ``inner_clip`` clips each inner gradient's global norm.
    ``strategy``/``chunk_size`` choose how tasks are batched (see ``over_tasks``).

    Returns ``(grads, metrics)`` with ``grads`` shaped like ``params``.
    """
    check_tasks(tasks)
    check_strategy(strategy, chunk_size)
    names = check_inner_config(
        params, inner_lr=inner_lr, inner_steps=inner_steps, adapted=adapted, inner_clip=inner_clip
    )
    check_model_fits_tasks(apply, params, buffers, tasks)
    if step_weights is not None:
        step_weights = torch.as_tensor(step_weights)
        if step_weights.shape != (inner_steps,) or not bool(torch.isfinite(step_weights).all()):
            raise ValueError(
                f"step_weights: expected {inner_steps} finite weights (one per inner step), "
                f"got shape {tuple(step_weights.shape)}"
            )
    task_loss = partial(
        maml_loss,
        apply=apply,
        buffers=buffers,
        loss_fn=loss,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        first_order=first_order,
        adapted=names,
        inner_clip=inner_clip,
        step_weights=step_weights,
    )
    return meta_gradient(task_loss, params, tasks, strategy=strategy, chunk_size=chunk_size)


def maml_step(
    params: Params,
    opt_state: Any,
    tasks: TaskBatch,
    *,
    optimizer: GradientTransformation,
    **maml_options: Any,
) -> tuple[Params, Any, Metrics]:
    """One MAML meta-update: :func:`maml_grad` (same keyword options) then ``optimizer``.

    Returns ``(new_params, new_opt_state, metrics)``; the inputs are not modified.
    """
    grads, metrics = maml_grad(params, tasks, **maml_options)
    params, opt_state = meta_update(grads, params, opt_state, optimizer)
    return params, opt_state, metrics
