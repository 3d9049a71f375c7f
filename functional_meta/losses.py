"""Task losses: pure ``(meta_params, task) -> (loss, aux)`` functions.

One function, :func:`maml_loss`, covers MAML (second order), first-order MAML, MAML++'s
multi-step loss, Meta-SGD and ANIL: they differ only in what the inner loop is given (see
``functional_meta.inner.adapt``). Bind the configuration with ``functools.partial`` or a
closure and lift the result to a batch of tasks with ``functional_meta.over_tasks``.

``aux`` is a dict of tensors: ``support_losses [steps]``, ``query_loss []`` (after the last
step), ``accuracy []`` for classification (integer labels), and ``query_losses [steps]``
when the multi-step loss is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch

from functional_meta import tree
from functional_meta.data.tasks import Task
from functional_meta.inner import LearningRate, LossFn, Params, adapt, at_stage, forward

__all__ = ["accuracy", "maml_loss", "msl_weights", "query_scores"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits [N, C], -1) == labels [N]``, a 0-d float tensor."""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def _scores(prediction: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    scores = {"loss": loss_fn(prediction, y)}
    if not y.dtype.is_floating_point:
        scores["accuracy"] = accuracy(prediction, y)
    return scores


def query_scores(
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """``{"loss": L(f(x), y)}`` plus ``"accuracy"`` when ``y`` holds class indices."""
    return _scores(apply(params, buffers, x), y, loss_fn)


def maml_loss(
    params: Params,
    task: Task,
    *,
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    buffers: Params,
    loss_fn: LossFn,
    inner_lr: LearningRate,
    inner_steps: int,
    first_order: bool = False,
    per_step_lr: bool = False,
    adapted: Collection[str] | None = None,
    inner_clip: float | None = None,
    per_step: Collection[str] = (),
    step_weights: torch.Tensor | None = None,
    minibatches: torch.Tensor | None = None,
    collect_batch_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MAML objective of one task (Finn et al. 2017, eq. 2 for one task).

    Adapt on the support set, ``θ' = adapt(θ)``, then score the query set:
    ``L = L_query(θ')``. With ``step_weights v [inner_steps]`` (MAML++'s multi-step loss,
    Antoniou et al. 2019, §4) the loss is ``Σ_t v_t · L_query(θ_t)`` over every step's
    parameters. Differentiate it with respect to ``params`` (and ``inner_lr`` when the rates
    are meta-learned) with ``torch.func.grad``.

    ``collect_batch_stats`` (MAML++ BNRS; ``apply`` must be a ``FunctionalModel``) adds
    ``aux["batch_stats"] = {layer: (mean [stages, C], var [stages, C])}``: the batch-norm
    statistics of every *stage* ``s = 0 .. inner_steps``, taken from the support forward
    at ``θ_s`` for ``s < inner_steps`` and from the query forward at ``θ_steps`` for the last
    stage: the forwards that evaluation with running statistics replaces. They are read off
    those forwards as they run (no extra pass over the data).

    Shapes: ``task.support_x [S, ...]``, ``task.support_y [S]`` (or ``[S, D]``), likewise
    the query. Returns ``(loss [], aux)`` as described in the module docstring.
    """

    def score(stage_params: Params, stage: int, statistics: bool = False) -> tuple[dict, dict]:
        current = at_stage(stage_params, per_step, stage)
        state = at_stage(buffers, per_step, stage)
        prediction, seen = forward(apply, current, state, task.query_x, statistics=statistics)
        return _scores(prediction, task.query_y, loss_fn), seen

    def after_step(stage_params: Params, stage: int) -> dict | None:
        # The multi-step loss scores every intermediate stage; the last is scored below.
        return score(stage_params, stage)[0] if stage < inner_steps else None

    adaptation = adapt(
        apply,
        params,
        buffers,
        task.support_x,
        task.support_y,
        loss_fn,
        lr=inner_lr,
        steps=inner_steps,
        first_order=first_order,
        per_step_lr=per_step_lr,
        adapted=adapted,
        clip_norm=inner_clip,
        per_step=per_step,
        minibatches=minibatches,
        after_step=None if step_weights is None else after_step,
        support_statistics=collect_batch_stats,
    )
    final, final_statistics = score(adaptation.params, inner_steps, collect_batch_stats)
    aux = {"support_losses": adaptation.support_losses.detach()}
    loss = final["loss"]
    if step_weights is not None:
        losses = torch.stack([scores["loss"] for scores in adaptation.trace[:-1]] + [loss])
        loss = torch.sum(step_weights * losses)
        aux["query_losses"] = losses.detach()
    aux["query_loss"] = final["loss"].detach()
    if "accuracy" in final:
        aux["accuracy"] = final["accuracy"].detach()
    if collect_batch_stats:
        stages = [*adaptation.support_statistics, final_statistics]
        aux["batch_stats"] = tree.map(lambda *xs: torch.stack(xs), *stages)
    return loss, aux


def msl_weights(epoch: float, inner_steps: int, anneal_epochs: float) -> torch.Tensor:
    """MAML++'s per-step loss importance ``v [inner_steps]`` at training progress ``epoch``.

    Starts uniform (``1/n`` each), then every non-final weight decays linearly by
    ``epoch / (n · anneal_epochs)`` down to a floor of ``0.03 / n`` while the final weight
    grows by the same total, capped at ``1 − (n − 1) · 0.03 / n`` (Antoniou et al. 2019,
    §4 "multi-step loss optimisation"; the paper anneals by epoch, not by iteration). A pure
    function of ``epoch``: calling it never changes anything. Sums to 1 at every epoch.
    """
    if inner_steps < 1:
        raise ValueError(f"msl_weights: inner_steps must be >= 1, got {inner_steps}")
    if not anneal_epochs > 0 or not math.isfinite(anneal_epochs):
        raise ValueError(f"msl_weights: anneal_epochs must be positive, got {anneal_epochs}")
    if epoch < 0:
        raise ValueError(f"msl_weights: epoch must be >= 0, got {epoch}")
    n = inner_steps
    if n == 1:
        return torch.ones(1)
    decay = epoch / n / anneal_epochs
    floor = 0.03 / n
    weights = [max(1.0 / n - decay, floor) for _ in range(n - 1)]
    weights.append(min(1.0 / n + (n - 1) * decay, 1.0 - (n - 1) * floor))
    return torch.tensor(weights)
