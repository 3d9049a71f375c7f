"""Task losses: pure ``(params, task) -> (loss, aux)`` functions, and how a prediction is scored.

:func:`maml_loss` is the one adapt-then-score objective behind MAML, first-order MAML,
ANIL, Meta-SGD and MAML++: they differ only in the :class:`~functional_meta.inner.InnerLoop`
and the rates they give it, and in the multi-step loss weights. The algorithm modules bind
those and lift the result to a batch of tasks with ``functional_meta.batching``.

``aux`` is a dict of tensors: ``support_losses [steps]``, ``query_loss []`` (after the last
step), ``accuracy []`` for classification (integer labels), ``query_losses [steps]`` when
the multi-step loss is on, and ``statistics`` (what the inner loop's ``forward`` hook
reported at every stage ``0 .. steps``, stacked along a leading stage axis) when the hook
reports anything.
"""

from __future__ import annotations

import math

import torch

from functional_meta import tree
from functional_meta.data.tasks import Task
from functional_meta.inner import Apply, InnerLoop, LossFn, Params, Rates, adapt

__all__ = ["accuracy", "maml_loss", "msl_weights", "scores"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits [N, C], -1) == labels [N]``, a 0-d float tensor."""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def scores(prediction: torch.Tensor, y: torch.Tensor, loss: LossFn) -> dict[str, torch.Tensor]:
    """``{"loss": loss(prediction, y)}`` plus ``"accuracy"`` when ``y`` holds class indices.
    Regression targets must have the predictions' shape (a loss would broadcast others
    silently); a shape check only, safe under ``vmap``."""
    if y.dtype.is_floating_point and prediction.shape != y.shape:
        raise ValueError(
            f"query_y: regression targets of shape {tuple(y.shape)} do not match the "
            f"predictions of shape {tuple(prediction.shape)} (one target per model output)"
        )
    result = {"loss": loss(prediction, y)}
    if not y.dtype.is_floating_point:
        result["accuracy"] = accuracy(prediction, y)
    return result


def maml_loss(
    params: Params,
    task: Task,
    *,
    apply: Apply,
    buffers: Params,
    loss: LossFn,
    inner: InnerLoop,
    rates: Rates | None = None,
    step_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MAML objective of one task (Finn et al. 2017, eq. 2 for one task).

    Adapt on the support set, ``θ' = adapt(θ)`` (see :func:`functional_meta.adapt`; ``rates``
    replaces ``inner.lr`` with meta-learned rates), then score the query set:
    ``L = L_query(θ')``. With ``step_weights v [inner.steps]`` (MAML++'s multi-step loss,
    Antoniou et al. 2019, §4) the loss is ``Σ_t v_t · L_query(θ_t)`` over every step's
    parameters. Differentiate it with respect to ``params`` (and the tensors behind
    ``rates``) with ``torch.func.grad``.

    Shapes: ``task.support_x [S, ...]``, ``task.support_y [S]`` (or ``[S, D]``), likewise
    the query. Returns ``(loss [], aux)`` as described in the module docstring.
    """

    def score(stage_params: Params, stage: int) -> tuple[dict[str, torch.Tensor], dict]:
        prediction, report = inner.forward(apply, stage_params, buffers, task.query_x, stage)
        return scores(prediction, task.query_y, loss), report

    def after_step(stage_params: Params, stage: int) -> dict[str, torch.Tensor] | None:
        # The multi-step loss scores every intermediate stage; the last is scored below.
        return score(stage_params, stage)[0] if stage < inner.steps else None

    adaptation = adapt(
        apply,
        params,
        buffers,
        task.support_x,
        task.support_y,
        loss,
        inner,
        rates=rates,
        after_step=None if step_weights is None else after_step,
    )
    final, final_report = score(adaptation.params, inner.steps)
    aux = {"support_losses": adaptation.support_losses.detach()}
    objective = final["loss"]
    if step_weights is not None:
        losses = torch.stack([s["loss"] for s in adaptation.trace[:-1]] + [objective])
        objective = torch.sum(step_weights * losses)
        aux["query_losses"] = losses.detach()
    aux["query_loss"] = final["loss"].detach()
    if "accuracy" in final:
        aux["accuracy"] = final["accuracy"].detach()
    if final_report:
        aux["statistics"] = tree.map(lambda *xs: torch.stack(xs), *adaptation.reports, final_report)
    return objective, aux


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
