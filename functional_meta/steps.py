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
from typing import Any

import torch

from functional_meta.batching import Strategy, check_strategy, mean_value_and_grad
from functional_meta.checks import (
    check_finite,
    check_inner_config,
    check_inner_steps,
    check_model_fits_tasks,
    check_positive_number,
    check_tasks,
)
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import LearningRate, LossFn, Params
from functional_meta.losses import maml_loss
from functional_meta.optim import GradientTransformation, apply_updates
from functional_meta.tree import select_names

__all__ = [
    "check_meta_params",
    "maml_family_grad",
    "maml_grad",
    "maml_step",
    "meta_gradient",
    "meta_update",
    "metasgd_grad",
    "metasgd_init",
    "metasgd_step",
    "summarize",
]

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
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    model: Any = None,
) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """``∇ (1/T) Σ_i L_i(meta_params)`` over the tasks, checked finite.

    Returns ``(grads, losses [T], aux)`` with ``aux`` stacked over tasks; see
    ``functional_meta.batching.mean_value_and_grad``. Raises ``NonFiniteError`` when a loss
    or gradient entry is NaN or infinite.
    """
    grads, losses, aux = mean_value_and_grad(
        task_loss, meta_params, tasks, strategy=strategy, chunk_size=chunk_size, model=model
    )
    check_finite(losses, grads)
    return grads, losses, aux


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


def check_meta_params(meta_params: Any) -> tuple[Params, Any]:
    """``meta_params`` must be ``{"params": {...}}`` plus, optionally, ``"inner_lr"``."""
    if (
        not isinstance(meta_params, dict)
        or "params" not in meta_params
        or not (meta_params.keys() <= {"params", "inner_lr"})
    ):
        raise TypeError(
            "meta_params: expected {'params': {name: tensor}, 'inner_lr': {name: tensor}} as made "
            f"by metasgd_init/mamlpp_init, got {type(meta_params).__name__}"
            + (f" with keys {sorted(meta_params)}" if isinstance(meta_params, dict) else "")
        )
    return meta_params["params"], meta_params.get("inner_lr")


def maml_family_grad(
    meta_params: dict[str, Any],
    tasks: TaskBatch,
    *,
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    buffers: Params,
    loss: LossFn,
    inner_lr: LearningRate | None = None,
    inner_steps: int = 1,
    first_order: bool = False,
    per_step_lr: bool = False,
    step_weights: torch.Tensor | None = None,
    adapted: Collection[str] | Callable[[str], bool] | None = None,
    inner_clip: float | None = None,
    per_step: Collection[str] = (),
    collect_batch_stats: bool = False,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[dict[str, Any], torch.Tensor, dict[str, Any]]:
    """The meta-gradient shared by MAML, FOMAML, ANIL, Meta-SGD and MAML++.

    ``meta_params = {"params": θ}`` with a fixed ``inner_lr``, or
    ``{"params": θ, "inner_lr": α}`` when the rates are meta-learned (Meta-SGD, LSLR); the
    gradient has the same structure. Checks every input, then returns
    ``meta_gradient``'s ``(grads, losses [T], aux)``.
    """
    check_tasks(tasks)
    check_strategy(strategy, chunk_size)
    params, learned_lr = check_meta_params(meta_params)
    if (learned_lr is None) == (inner_lr is None):
        raise ValueError(
            "inner_lr: give a fixed inner_lr or meta-learned rates in meta_params, not both"
        )
    rates = inner_lr if learned_lr is None else learned_lr
    names = check_inner_config(
        params,
        inner_lr=rates,
        inner_steps=inner_steps,
        per_step_lr=per_step_lr,
        adapted=adapted,
        inner_clip=inner_clip,
        per_step=per_step,
    )
    check_model_fits_tasks(apply, params, buffers, tasks, per_step)
    if step_weights is not None:
        step_weights = torch.as_tensor(step_weights)
        if step_weights.shape != (inner_steps,) or not bool(torch.isfinite(step_weights).all()):
            raise ValueError(
                f"step_weights: expected {inner_steps} finite weights (one per inner step), "
                f"got shape {tuple(step_weights.shape)}"
            )
    options = dict(
        apply=apply,
        buffers=buffers,
        loss_fn=loss,
        inner_steps=inner_steps,
        first_order=first_order,
        per_step_lr=per_step_lr,
        adapted=names,
        inner_clip=inner_clip,
        per_step=frozenset(per_step),
        step_weights=step_weights,
        collect_batch_stats=collect_batch_stats,
    )

    def task_loss(meta: dict[str, Any], task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return maml_loss(meta["params"], task, inner_lr=meta.get("inner_lr", inner_lr), **options)

    return meta_gradient(
        task_loss, meta_params, tasks, strategy=strategy, chunk_size=chunk_size, model=apply
    )


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
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[Params, Metrics]:
    """The MAML meta-gradient of a meta-batch (Finn et al. 2017, Algorithm 2, line 10).

    ``∇_θ (1/T) Σ_i L_query,i(adapt_i(θ))`` with ``adapt`` the inner loop of
    ``inner_steps`` SGD steps at ``inner_lr`` on each task's support set. ``first_order``
    drops the second-order term (FOMAML); ``step_weights [inner_steps]`` turns on MAML++'s
    multi-step loss; ``adapted`` (names or a predicate) restricts adaptation to some
    parameters (ANIL: ``adapted=lambda name: name.startswith("head.")``); ``inner_clip``
    clips each inner gradient's global norm. ``strategy``/``chunk_size`` choose how tasks
    are batched (see ``over_tasks``).

    Returns ``(grads, metrics)`` with ``grads`` shaped like ``params``.
    """
    grads, losses, aux = maml_family_grad(
        {"params": params},
        tasks,
        apply=apply,
        buffers=buffers,
        loss=loss,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        first_order=first_order,
        step_weights=step_weights,
        adapted=adapted,
        inner_clip=inner_clip,
        strategy=strategy,
        chunk_size=chunk_size,
    )
    return grads["params"], summarize(losses, aux)


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


def metasgd_init(
    params: Params,
    inner_lr: float = 0.01,
    *,
    inner_steps: int | None = None,
    adapted: Collection[str] | Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Meta-SGD's meta-parameters ``{"params": θ, "inner_lr": α}`` (Li et al. 2017).

    ``α`` has one learnable rate per weight (``α[name]`` shaped like ``θ[name]``), all set to
    ``inner_lr``; with ``inner_steps`` it gets a leading step axis (one rate per weight per
    step; train with ``per_step_lr=True``). Only the ``adapted`` parameters get rates.
    """
    check_positive_number("metasgd_init: inner_lr", inner_lr)
    names = sorted(select_names(params, adapted))
    steps = () if inner_steps is None else (check_inner_steps(inner_steps),)
    rates = {
        name: torch.full(
            (*steps, *params[name].shape),
            float(inner_lr),
            dtype=params[name].dtype,
            device=params[name].device,
        )
        for name in names
    }
    return {"params": dict(params), "inner_lr": rates}


def metasgd_grad(
    meta_params: dict[str, Any],
    tasks: TaskBatch,
    *,
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    buffers: Params,
    loss: LossFn,
    inner_steps: int = 1,
    per_step_lr: bool = False,
    first_order: bool = False,
    inner_clip: float | None = None,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[dict[str, Any], Metrics]:
    """Meta-SGD's meta-gradient with respect to both ``θ`` and the rates ``α``:
    ``θ' = θ − α ⊙ ∇L_support(θ)``, objective ``(1/T) Σ_i L_query,i(θ'_i)`` (Li et al. 2017,
    eq. 4-5). The parameters adapted are those that have a rate in ``meta_params["inner_lr"]``.
    """
    _, rates = check_meta_params(meta_params)
    grads, losses, aux = maml_family_grad(
        meta_params,
        tasks,
        apply=apply,
        buffers=buffers,
        loss=loss,
        inner_steps=inner_steps,
        first_order=first_order,
        per_step_lr=per_step_lr,
        adapted=None if rates is None else sorted(rates),
        inner_clip=inner_clip,
        strategy=strategy,
        chunk_size=chunk_size,
    )
    return grads, summarize(losses, aux)


def metasgd_step(
    meta_params: dict[str, Any],
    opt_state: Any,
    tasks: TaskBatch,
    *,
    optimizer: GradientTransformation,
    **metasgd_options: Any,
) -> tuple[dict[str, Any], Any, Metrics]:
    """One Meta-SGD meta-update of ``θ`` and ``α`` together: :func:`metasgd_grad` (same
    keyword options) then ``optimizer``. Returns ``(meta_params, opt_state, metrics)``."""
    grads, metrics = metasgd_grad(meta_params, tasks, **metasgd_options)
    meta_params, opt_state = meta_update(grads, meta_params, opt_state, optimizer)
    return meta_params, opt_state, metrics
