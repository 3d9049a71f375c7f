"""Reptile (Nichol, Achiam and Schulman 2018): move toward the mean adapted parameters.

For each task ``i`` of a meta-batch, adapt with ``k`` SGD steps, ``φ_i = adapt_i(θ)`` (the
core inner loop, first order: nothing is differentiated through it). The meta-update is

    θ ← θ + ε · ((1/T) Σ_i φ_i − θ)                         (Reptile, batched version)

which is plain SGD at rate ``ε`` on the pseudo-gradient ``g = θ − (1/T) Σ_i φ_i``. Handing
``g`` to any functional optimizer instead (e.g. Adam) gives the paper's Adam variant.
No outer graph is built, so memory does not grow with the number of inner steps. At
evaluation Reptile adapts like MAML: the same inner loop on the support set.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from functional_meta import tree
from functional_meta.algorithms.maml import gradient_based
from functional_meta.batching import Batching, over_tasks
from functional_meta.checks import check_algorithm_parts, check_meta_batch
from functional_meta.data.tasks import Task, TaskBatch, map_inputs
from functional_meta.inner import Apply, InnerLoop, LossFn, Params, adapt
from functional_meta.model import seeded_randomness
from functional_meta.steps import Algorithm, Gradient, own_loop, summarize
from functional_meta.validation import check_count

__all__ = ["reptile", "reptile_grad", "reptile_minibatches", "reptile_step"]

KEYS = frozenset({"params"})


def reptile_minibatches(
    num_examples: int, inner_steps: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices ``[inner_steps, batch_size]`` of the examples each inner step uses: a fresh
    random subset (without replacement) per step, shared by all tasks of the meta-batch."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size: expected an integer in 1..{num_examples} (the examples per task), "
            f"got {batch_size}"
        )
    return torch.stack(
        [torch.randperm(num_examples, generator=generator)[:batch_size] for _ in range(inner_steps)]
    )


def reptile(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(steps=5),
    *,
    batching: Batching = Batching(),
    batch_size: int | None = None,
    use_query: bool = True,
) -> Algorithm:
    """Reptile's record. ``use_query=True`` adapts on each task's support and query examples
    together, as the original does (Reptile has no separate query loss); ``False`` on the
    support set only. ``batch_size`` draws a random mini-batch of that many examples per
    inner step from the ``generator`` the step is given (required then). Reptile adapts
    first order whatever ``inner.first_order`` says: nothing is differentiated through it.

    Its gradient is the pseudo-gradient ``g = θ − (1/T) Σ_i φ_i``; metrics: ``loss`` and
    ``support_losses`` are the inner losses (mean over tasks; ``loss`` is the last step's).
    """
    check_algorithm_parts(model, loss, inner, batching)
    check_count("batch_size", batch_size, optional=True)
    first_order = replace(inner, first_order=True)

    def task_adapt(params: Params, task: Task, buffers: Params, minibatches: Any) -> tuple:
        result = adapt(model, params, buffers, task.support_x, task.support_y, loss,
                       first_order, minibatches=minibatches)  # fmt: skip
        return result.params, result.support_losses

    def grad(
        meta_params: dict[str, Any],
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Gradient:
        params = check_meta_batch(model, meta_params, KEYS, buffers, tasks, loss=loss)
        if use_query:
            both = map_inputs(lambda s, q: torch.cat([s, q], dim=1), tasks.support_x, tasks.query_x)
            tasks = TaskBatch(
                both,
                torch.cat([tasks.support_y, tasks.query_y], dim=1),
                tasks.query_x,
                tasks.query_y,
            )
        minibatches = None
        if batch_size is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    "generator: batch_size needs a torch.Generator for the mini-batches"
                )
            minibatches = reptile_minibatches(
                tasks.support_y.shape[1], inner.steps, batch_size, generator
            )
        with torch.no_grad(), seeded_randomness(model, generator, tasks.device):
            fast, support_losses = over_tasks(
                lambda p, task: task_adapt(p, task, buffers, minibatches), batching, model=model
            )(params, tasks)
            pseudo_grads = tree.map(lambda p, f: p - f.mean(dim=0), params, fast)
        metrics = summarize(  # checks the losses and pseudo-gradients in the same read
            support_losses[:, -1], {"support_losses": support_losses}, check=pseudo_grads
        )
        return Gradient({"params": pseudo_grads}, metrics)

    evaluation = gradient_based("reptile", model, loss, first_order, batching)
    return evaluation._replace(grad=grad)


reptile_grad, reptile_step = own_loop(reptile, plain_params=True)
reptile_grad.__doc__ = """Reptile's pseudo-gradient ``g = θ − (1/T) Σ_i φ_i`` and the adaptation
metrics, for a user's own loop: keyword options as ``maml_grad``'s plus :func:`reptile`'s
(``batch_size``, ``use_query``) and ``generator`` (for the inner mini-batches)."""
reptile_step.__doc__ = """One Reptile meta-update: :func:`reptile_grad` (same keyword options),
then ``optimizer`` on the pseudo-gradient (``optim.sgd(ε)`` is the paper's update).
Returns ``(new_params, new_opt_state, metrics)``."""
