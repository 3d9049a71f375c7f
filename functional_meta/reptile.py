"""Reptile (Nichol, Achiam and Schulman 2018): move toward the mean adapted parameters.

For each task ``i`` of a meta-batch, adapt with ``k`` SGD steps, ``φ_i = adapt_i(θ)`` (the
core inner loop, first order: nothing is differentiated through it). The meta-update is

    θ ← θ + ε · ((1/T) Σ_i φ_i − θ)                         (Reptile, batched version)

which is plain SGD at rate ``ε`` on the pseudo-gradient ``g = θ − (1/T) Σ_i φ_i``. Handing
``g`` to any functional optimizer instead (e.g. Adam) gives the paper's Adam variant.
No outer graph is built, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functional_meta import tree
from functional_meta.batching import Strategy, check_strategy, over_tasks
from functional_meta.checks import (
    check_finite,
    check_inner_config,
    check_model_fits_tasks,
    check_tasks,
)
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import LossFn, Params, adapt
from functional_meta.optim import GradientTransformation
from functional_meta.steps import Metrics, meta_update, summarize

__all__ = ["reptile_grad", "reptile_minibatches", "reptile_step"]


def reptile_minibatches(
    num_examples: int, inner_steps: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices ``[inner_steps, batch_size]`` of the examples each inner step uses: a fresh
    random subset (without replacement) per step, shared by all tasks of the meta-batch."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"inner_batch_size: expected an integer in 1..{num_examples} (the examples per task), "
            f"got {batch_size}"
        )
    return torch.stack(
        [torch.randperm(num_examples, generator=generator)[:batch_size] for _ in range(inner_steps)]
    )


def reptile_grad(
    params: Params,
    tasks: TaskBatch,
    *,
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    buffers: Params,
    loss: LossFn,
    inner_lr: float,
    inner_steps: int = 5,
    inner_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    use_query: bool = True,
    inner_clip: float | None = None,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[Params, Metrics]:
    """Reptile's pseudo-gradient ``g = θ − (1/T) Σ_i φ_i`` and the adaptation metrics.

    ``use_query=True`` adapts on each task's support and query examples together, as the
    original does (Reptile has no separate query loss); ``False`` adapts on the support set
    only. ``inner_batch_size`` draws a random mini-batch of that many examples per inner
    step from ``generator`` (required then). Metrics: ``loss`` and ``support_losses`` are
    the inner losses (mean over tasks; ``loss`` is the last step's).
    """
    check_tasks(tasks)
    check_strategy(strategy, chunk_size)
    check_inner_config(params, inner_lr=inner_lr, inner_steps=inner_steps, inner_clip=inner_clip)
    check_model_fits_tasks(apply, params, buffers, tasks)
    if use_query:
        tasks = TaskBatch(
            torch.cat([tasks.support_x, tasks.query_x], dim=1),
            torch.cat([tasks.support_y, tasks.query_y], dim=1),
            tasks.query_x,
            tasks.query_y,
        )
    minibatches = None
    if inner_batch_size is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "generator: inner_batch_size needs a torch.Generator for the mini-batches"
            )
        minibatches = reptile_minibatches(
            tasks.support_x.shape[1], inner_steps, inner_batch_size, generator
        )

    def adapted(p: Params, task: Task) -> tuple[Params, torch.Tensor]:
        result = adapt(
            apply, p, buffers, task.support_x, task.support_y, loss,
            lr=inner_lr, steps=inner_steps, first_order=True,
            clip_norm=inner_clip, minibatches=minibatches,
        )  # fmt: skip
        return result.params, result.support_losses

    with torch.no_grad():
        fast, support_losses = over_tasks(
            adapted, strategy=strategy, chunk_size=chunk_size, model=apply
        )(params, tasks)
        pseudo_grads = tree.map(lambda p, f: p - f.mean(dim=0), params, fast)
    check_finite(support_losses[:, -1], pseudo_grads)
    return pseudo_grads, summarize(support_losses[:, -1], {"support_losses": support_losses})


def reptile_step(
    params: Params,
    opt_state: Any,
    tasks: TaskBatch,
    *,
    optimizer: GradientTransformation,
    **reptile_options: Any,
) -> tuple[Params, Any, Metrics]:
    """One Reptile meta-update: :func:`reptile_grad` (same keyword options), then
    ``optimizer`` on the pseudo-gradient (``optim.sgd(ε)`` is the paper's update).
    Returns ``(new_params, new_opt_state, metrics)``."""
    grads, metrics = reptile_grad(params, tasks, **reptile_options)
    params, opt_state = meta_update(grads, params, opt_state, optimizer)
    return params, opt_state, metrics
