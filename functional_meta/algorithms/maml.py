"""MAML (Finn, Abbeel and Levine 2017) and first-order MAML, and the gradient-based family's core.

MAML's meta-objective over a meta-batch of ``T`` tasks (Algorithm 2; eq. 1-2):

    θ'_i = θ − α ∇_θ L_support,i(θ)        (``inner.steps`` times; ``functional_meta.adapt``)
    min_θ (1/T) Σ_i L_query,i(θ'_i)

differentiated through the inner loop (second order), or with the inner gradients
detached (``first_order=True``: FOMAML, the query gradient at the adapted parameters).

:func:`gradient_based` builds the record that MAML, ANIL, Meta-SGD and MAML++ share: they
differ only in their meta-parameters (``init``), where their inner rates come from
(``rates``), and in schedules over training (``schedule``). :func:`maml_grad` and
:func:`maml_step` are the same algorithm for a user's own loop, on a plain parameter dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from functional_meta.batching import Batching
from functional_meta.body_and_head import BodyAndHead
from functional_meta.checks import check_algorithm_parts, check_meta_batch, check_support_set
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import Apply, InnerLoop, LossFn, Params, Rates, adapt
from functional_meta.losses import maml_loss
from functional_meta.model import draws_randomness, evaluation_mode, seeded_randomness
from functional_meta.steps import (
    Algorithm,
    Gradient,
    keep_buffers,
    loss_gradient,
    own_loop,
)
from functional_meta.validation import check_count

__all__ = [
    "Adapted",
    "Schedule",
    "fomaml",
    "gradient_based",
    "maml",
    "maml_grad",
    "maml_step",
    "params_only",
]

MetaParams = dict[str, Any]


class Adapted(NamedTuple):
    """One task's adapted model: ``params`` and ``buffers`` after ``stage`` inner steps."""

    params: Params
    buffers: Params
    stage: int


class Schedule(NamedTuple):
    """What changes with training progress: the inner loop to train with and the
    multi-step loss weights ``[inner.steps]`` (``None``: the last step's query loss only)."""

    inner: InnerLoop
    step_weights: torch.Tensor | None = None


def params_only(params: Params, buffers: Params) -> tuple[MetaParams, Params]:
    """The ``init`` of algorithms whose only meta-parameters are the model's: ``{"params": θ}``."""
    return {"params": {k: v.clone() for k, v in params.items()}}, dict(buffers)


def gradient_based(
    name: str,
    model: Apply,
    loss: LossFn,
    inner: InnerLoop,
    batching: Batching,
    *,
    init: Callable[[Params, Params], tuple[MetaParams, Params]] = params_only,
    keys: frozenset[str] = frozenset({"params"}),
    rates: Callable[[MetaParams], Rates | None] = lambda meta: None,
    check: Callable[[MetaParams, frozenset[str]], None] = lambda meta, names: None,
    schedule: Callable[[float], Schedule] | None = None,
    evaluation: InnerLoop | None = None,
    evaluation_model: Apply | None = None,
    after_update: Callable[[Params, Any], Params] = keep_buffers,
    extends_steps: bool = True,
    body_and_head: BodyAndHead | None = None,
) -> Algorithm:
    """The record of an adapt-then-score algorithm (MAML and its relatives).

    Training minimises :func:`functional_meta.losses.maml_loss` over tasks with the inner
    loop and weights of ``schedule(epoch)`` (default: ``inner``, no multi-step loss) and
    the rates ``rates(meta_params)`` (``None``: ``inner.lr``). ``check(meta_params,
    adapted_names)`` validates algorithm-specific meta-parameters. Evaluation adapts with
    ``evaluation`` (default ``inner``), first order, on ``evaluation_model`` (default
    ``model``) in evaluation mode (dropout off). A model with dropout in training mode
    draws its masks in ``grad`` from the ``generator`` it is given, if any
    (:func:`functional_meta.model.seeded_randomness`). ``keys`` are the meta-parameters'
    keys, as ``init`` makes them. ``body_and_head`` (ANIL's, with ``inner.adapted`` the
    head's parameters and no ``rates``): the same algorithm with the body run once per task
    and input, and the inner loop on the head alone (``functional_meta.body_and_head``).
    """
    if batching.strategy == "compile" and draws_randomness(model):
        raise ValueError(
            'batching: strategy "compile" cannot train a model that draws random numbers '
            "(dropout in training mode): torch.compile of torch 2.13 fails on dropout under "
            'vmap once shapes become dynamic. Use Batching("vmap") (the same per-task '
            "masks) or functionalize the module in .eval() mode"
        )
    schedule = schedule or (lambda epoch: Schedule(inner))
    evaluation = evaluation or inner
    evaluation_model = evaluation_mode(evaluation_model or model)
    evaluation_split = body_and_head.evaluation() if body_and_head else None

    def task_objective(
        params: Params, task: Task, buffers: Params, current: Schedule, task_rates: Rates | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if body_and_head is None:
            return maml_loss(
                params, task, apply=model, buffers=buffers, loss=loss, inner=current.inner,
                rates=task_rates, step_weights=current.step_weights,
            )  # fmt: skip
        if task_rates is not None:
            raise ValueError("body_and_head: the split runs the head with inner.lr; learned "
                             "rates need the whole model")  # fmt: skip
        head, head_buffers, features = body_and_head.features(params, buffers, task)
        return maml_loss(
            head, features, apply=body_and_head.head, buffers=head_buffers, loss=loss,
            inner=current.inner, step_weights=current.step_weights,
        )  # fmt: skip

    def objective(
        meta_params: MetaParams,
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Callable[[MetaParams, Task], tuple[torch.Tensor, dict[str, Any]]]:
        params = check_meta_batch(model, meta_params, keys, buffers, tasks, inner.forward,
                                  loss=loss)  # fmt: skip
        check(meta_params, inner.adapted_names(params))
        current = schedule(epoch)
        if body_and_head is not None:  # the split adapts every parameter of the head
            current = current._replace(inner=replace(current.inner, adapted=None))

        def task_loss(meta: MetaParams, task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
            return task_objective(meta["params"], task, buffers, current, rates(meta))

        return task_loss

    def grad(
        meta_params: MetaParams,
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Gradient:
        task_loss = objective(meta_params, buffers, tasks, epoch=epoch, generator=generator)
        with seeded_randomness(model, generator, tasks.device):
            return loss_gradient(task_loss, meta_params, tasks, batching, model)

    def adapt_task(
        meta_params: MetaParams,
        buffers: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
    ) -> Adapted:
        check_support_set(model, support_x, support_y)  # the model grad has checked
        check_count("steps", steps, minimum=0, optional=True)
        steps = evaluation.steps if steps is None else steps
        if steps == 0:
            return Adapted(meta_params["params"], buffers, 0)
        how = replace(evaluation, steps=steps, first_order=True)
        if evaluation_split is None:
            result = adapt(evaluation_model, meta_params["params"], buffers, support_x,
                           support_y, loss, how, rates=rates(meta_params))  # fmt: skip
            return Adapted(result.params, buffers, steps)
        body, head = evaluation_split.split(meta_params["params"])
        body_buffers, head_buffers = evaluation_split.split(buffers)
        features = evaluation_split.body(body, body_buffers, support_x)
        result = adapt(evaluation_split.head, head, head_buffers, features, support_y, loss,
                       replace(how, adapted=None))  # fmt: skip
        return Adapted(evaluation_split.join(body, result.params), buffers, steps)

    def predict(adapted: Adapted, x: torch.Tensor) -> torch.Tensor:
        return evaluation.forward(evaluation_model, adapted.params, adapted.buffers, x,
                                  adapted.stage)[0]  # fmt: skip

    return Algorithm(
        name=name, init=init, grad=grad, adapt=adapt_task, predict=predict,
        after_update=after_update, loss=loss, model=model, batching=batching,
        inner_steps=inner.steps, extends_steps=extends_steps, objective=objective,
    )  # fmt: skip


def maml(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(),
    *,
    batching: Batching = Batching(),
    step_weights: torch.Tensor | None = None,
) -> Algorithm:
    """MAML's record (second order unless ``inner.first_order``). ``step_weights
    [inner.steps]`` weighs every step's query loss (a fixed multi-step loss)."""
    check_algorithm_parts(model, loss, inner, batching)
    if step_weights is not None:
        step_weights = torch.as_tensor(step_weights)
        if step_weights.shape != (inner.steps,) or not bool(torch.isfinite(step_weights).all()):
            raise ValueError(
                f"step_weights: expected {inner.steps} finite weights (one per inner step), "
                f"got shape {tuple(step_weights.shape)}"
            )
    name = "fomaml" if inner.first_order else "maml"
    return gradient_based(name, model, loss, inner, batching,
                          schedule=lambda epoch: Schedule(inner, step_weights))  # fmt: skip


def fomaml(
    model: Apply, loss: LossFn, inner: InnerLoop = InnerLoop(), *, batching: Batching = Batching()
) -> Algorithm:
    """First-order MAML's record: :func:`maml` with ``inner.first_order`` set."""
    check_algorithm_parts(model, loss, inner, batching)
    return maml(model, loss, replace(inner, first_order=True), batching=batching)


maml_grad, maml_step = own_loop(maml, plain_params=True)
maml_grad.__doc__ = """The MAML meta-gradient of a meta-batch (Finn et al. 2017, Algorithm 2, line
10), ``∇_θ (1/T) Σ_i L_query,i(adapt_i(θ))``, for a user's own loop and optimizer
(``torch.optim`` via ``functional_meta.optim.assign_grads``)::

    grads, metrics = maml_grad(params, tasks, apply=apply, buffers=buffers, loss=loss,
                               inner=InnerLoop(lr=0.4, steps=1), batching=Batching())

``inner`` configures the adaptation (rate, steps, first order, adapted parameters —
ANIL: ``InnerLoop(adapted=lambda name: name.startswith("head."))`` — and clipping);
``batching`` how tasks are batched; ``step_weights=[inner.steps]`` a fixed multi-step loss.
Returns ``(grads, metrics)`` with ``grads`` shaped like ``params``."""
maml_step.__doc__ = """One MAML meta-update: :func:`maml_grad` (same keyword options) then
``optimizer``. Returns ``(new_params, new_opt_state, metrics)``; nothing given is modified."""
