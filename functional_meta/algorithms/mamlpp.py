"""MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML"), every fix a switch.

:func:`mamlpp` builds its record; its switches default to every component on:

- **MSL**, multi-step loss: while ``epoch < msl_anneal_epochs`` the meta-loss is
  ``Σ_t v_t(epoch) · L_query(θ_t)`` over every inner step, with the importance ``v``
  annealed toward the last step (``functional_meta.losses.msl_weights``); from then on it
  is the last step's query loss alone, as in the authors' code (which then also skips the
  intermediate query forwards).
- **DA**, derivative-order annealing: first-order meta-gradients while
  ``epoch < first_order_epochs``, second order afterwards.
- **LSLR**, learned per-layer per-step inner rates: ``α[name][t]``, one scalar per parameter
  tensor per step, meta-learned with the outer optimizer.
- **BNWB**, per-step batch-norm weights and biases: each batch-norm ``weight``/``bias`` gets
  a leading *stage* axis (``inner_steps + 1`` copies); stage ``s`` is used by the forwards
  after ``s`` inner steps. They are meta-learned, not adapted in the inner loop.
- **BNRS**, per-step batch-norm running statistics: ``running_mean``/``running_var`` get the
  same stage axis. Training always normalises with batch statistics (as the paper's code
  did); each step also returns the per-stage batch statistics, averaged over tasks, and
  the record's ``after_update`` (:func:`update_running_statistics`) folds them into the
  buffers with momentum. The buffers
  are never written in place. Evaluation normalises with batch statistics too by default,
  as the authors' code did (it kept the running statistics but called batch norm with
  ``training=True`` at test time as well). With ``eval_running_stats=True`` the stage-``s``
  running statistics *replace* batch statistics, so a query prediction depends only on its own example and the support set;
  measured on Omniglot 5-way 1-shot, a model trained with per-task batch statistics then
  falls to chance (docs/algorithms/mamlpp.md), so this is not the default.
- **CA**, cosine annealing of the meta learning rate: :func:`mamlpp_optimizer`.

Every switch is an option of :func:`mamlpp`, which builds MAML++'s record from the
gradient-based core (``functional_meta.algorithms.maml.gradient_based``): the per-stage
tensors plug into the inner loop as its ``forward`` hook (:class:`PerStage`); the core
knows nothing of stages or batch norm.

The stage convention: the support forward of inner step ``t`` is stage ``t``; the query
forward after ``k`` steps is stage ``k``. Evaluation with more steps than training reuses
the last stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from functional_meta.algorithms.maml import Schedule, gradient_based
from functional_meta.algorithms.metasgd import learned_rates
from functional_meta.batching import Batching
from functional_meta.checks import check_algorithm_parts, check_rates
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import Apply, InnerLoop, LossFn, Params
from functional_meta.losses import msl_weights
from functional_meta.model import FunctionalModel
from functional_meta.optim import GradientTransformation, adam, cosine_decay
from functional_meta.steps import Algorithm, Metrics, TrainState, cosine_meta_optimizer, step
from functional_meta.validation import check_positive_number

__all__ = [
    "PerStage",
    "mamlpp",
    "mamlpp_optimizer",
    "mamlpp_step",
    "per_stage_names",
    "update_running_statistics",
]

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PerStage:
    """The inner loop's ``forward`` hook for per-stage tensors (BNWB, BNRS).

    Every name in ``names`` holds a leading stage axis; the forward at stage ``s`` uses
    slice ``min(s, stages - 1)``. With ``statistics``, it reports the batch-norm statistics
    that forward saw (``FunctionalModel.with_statistics``: read off the forward itself).
    """

    names: frozenset[str]
    statistics: bool = False

    def at(self, tensors: Params, stage: int) -> Params:
        """``tensors`` with each per-stage name replaced by its slice for ``stage``."""
        return {
            name: value[min(stage, value.shape[0] - 1)] if name in self.names else value
            for name, value in tensors.items()
        }

    def __call__(
        self, apply: Apply, params: Params, buffers: Params, x: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, Statistics]:
        params, buffers = self.at(params, stage), self.at(buffers, stage)
        if self.statistics:
            return apply.with_statistics(params, buffers, x)  # type: ignore[attr-defined]
        return apply(params, buffers, x), {}


def _functional_model(apply: Any) -> FunctionalModel:
    if not isinstance(apply, FunctionalModel):
        raise TypeError(
            "model: MAML++ needs the FunctionalModel returned by functionalize (to find its "
            f"batch-norm layers), got {type(apply).__name__}"
        )
    return apply


def per_stage_names(
    apply: FunctionalModel, *, per_step_bn_weights: bool = True, per_step_bn_stats: bool = True
) -> frozenset[str]:
    """The parameter and buffer names that carry a stage axis under those switches."""
    names: set[str] = set()
    for layer in _functional_model(apply).batch_norm_layers:
        if per_step_bn_weights:
            names |= {f"{layer}.weight", f"{layer}.bias"} & apply.param_names
        if per_step_bn_stats:
            names |= {f"{layer}.running_mean", f"{layer}.running_var"} & apply.buffer_names
    return frozenset(names)


def update_running_statistics(buffers: Params, batch_stats: Statistics, momentum: float) -> Params:
    """``running ← (1 − m) · running + m · batch`` for every layer's per-stage mean and
    variance (as ``nn.BatchNorm`` does, with the unbiased batch variance); increments
    ``num_batches_tracked``. Returns new buffers; the given ones are not modified."""
    updated = dict(buffers)
    for layer, (mean, var) in batch_stats.items():
        for suffix, value in (("running_mean", mean), ("running_var", var)):
            name = f"{layer}.{suffix}"
            updated[name] = torch.lerp(buffers[name], value.to(buffers[name].dtype), momentum)
        counter = f"{layer}.num_batches_tracked"
        if counter in buffers:
            updated[counter] = buffers[counter] + 1
    return updated


def mamlpp(
    model: FunctionalModel,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(lr=0.1, steps=5),
    *,
    batching: Batching = Batching(),
    multi_step_loss: bool = True,
    msl_anneal_epochs: float = 10.0,
    first_order_epochs: float = 50.0,
    learn_inner_lr: bool = True,
    per_step_bn_weights: bool = True,
    per_step_bn_stats: bool = True,
    bn_momentum: float = 0.1,
    eval_running_stats: bool = False,
) -> Algorithm:
    """MAML++'s record (the module docstring describes each switch).

    ``inner``: its rate starts the learned rates (LSLR) or is the fixed rate; its
    ``adapted`` selection is narrowed to the parameters without a stage axis; its
    ``first_order`` is decided by DA (``first_order_epochs``), not by the given value.
    Training progress ``epoch`` (a float) drives MSL and DA. With ``learn_inner_lr`` (LSLR)
    the learned rates scale the plain SGD step, so an ``inner.optimizer`` is refused
    (``ValueError``); without it the inner optimizer is used as given.
    """
    check_algorithm_parts(model, loss, inner, batching)
    if learn_inner_lr:
        inner.refuse_optimizer("mamlpp (learn_inner_lr)")
    model = _functional_model(model)
    check_positive_number("msl_anneal_epochs", msl_anneal_epochs)
    if not (first_order_epochs >= 0 and math.isfinite(first_order_epochs)):
        raise ValueError(
            f"first_order_epochs: expected a finite number >= 0, got {first_order_epochs}"
        )
    if not 0 < bn_momentum <= 1:
        raise ValueError(f"bn_momentum: expected a number in (0, 1], got {bn_momentum}")
    untracked = [
        n for n in model.batch_norm_layers if f"{n}.running_mean" not in model.buffer_names
    ]
    if per_step_bn_stats and untracked:
        raise ValueError(
            f"per_step_bn_stats: needs running statistics, but batch-norm layers {untracked} "
            "were built with track_running_stats=False"
        )
    staged = per_stage_names(
        model, per_step_bn_weights=per_step_bn_weights, per_step_bn_stats=per_step_bn_stats
    )
    selection = inner.adapted
    adapted = (
        (lambda name: name not in staged)
        if selection is None
        else (
            lambda name: (
                name not in staged
                and (selection(name) if callable(selection) else name in selection)
            )
        )
    )
    training = replace(
        inner, adapted=adapted, forward=PerStage(staged, statistics=per_step_bn_stats)
    )
    evaluation = replace(training, forward=PerStage(staged))
    stages = inner.steps + 1

    def init(params: Params, buffers: Params) -> tuple[dict[str, Any], Params]:
        model.check(params, buffers)

        def expand(tensors: Params) -> Params:
            return {
                name: value.unsqueeze(0).repeat(stages, *([1] * value.dim()))
                if name in staged
                else value.clone()
                for name, value in tensors.items()
            }

        meta: dict[str, Any] = {"params": expand(params)}
        if learn_inner_lr:
            meta["inner_lr"] = {
                name: torch.full((inner.steps,), inner.lr, dtype=value.dtype, device=value.device)
                for name, value in params.items()
                if name in training.adapted_names(params)
            }
        return meta, expand(buffers)

    def check(meta_params: dict[str, Any], names: frozenset[str]) -> None:
        if learn_inner_lr:
            check_rates(meta_params["inner_lr"], meta_params["params"], names, inner.steps, True)

    def schedule(epoch: float) -> Schedule:
        if not (isinstance(epoch, int | float) and epoch >= 0 and math.isfinite(epoch)):
            raise ValueError(f"epoch: expected a finite number >= 0, got {epoch!r}")
        weights = None
        if multi_step_loss and epoch < msl_anneal_epochs:
            weights = msl_weights(epoch, inner.steps, msl_anneal_epochs)
        return Schedule(replace(training, first_order=epoch < first_order_epochs), weights)

    def after_update(buffers: Params, statistics: Statistics | None) -> Params:
        if statistics is None:
            return buffers
        return update_running_statistics(buffers, statistics, bn_momentum)

    record = gradient_based(
        "mamlpp", model, loss, training, batching, init=init,
        keys=frozenset({"params", "inner_lr"} if learn_inner_lr else {"params"}),
        rates=learned_rates(True) if learn_inner_lr else (lambda meta: None),
        check=check, schedule=schedule, evaluation=evaluation,
        evaluation_model=model.using("running") if per_step_bn_stats and eval_running_stats else model,
        after_update=after_update,
    )  # fmt: skip
    grad = record.grad

    def grad_with_order(meta_params, buffers, tasks, *, epoch=0.0, generator=None):
        gradient = grad(meta_params, buffers, tasks, epoch=epoch, generator=generator)
        gradient.metrics["first_order"] = float(epoch < first_order_epochs)
        return gradient

    # objective=None: its grad adds a metric, so a compiled step stays gradient then update.
    return record._replace(
        grad=grad_with_order, meta_optimizer=cosine_meta_optimizer, objective=None
    )


def mamlpp_step(
    meta_params: dict[str, Any],
    opt_state: Any,
    buffers: Params,
    tasks: TaskBatch,
    *,
    optimizer: GradientTransformation,
    apply: FunctionalModel,
    loss: LossFn,
    epoch: float,
    inner: InnerLoop = InnerLoop(lr=0.1, steps=5),
    batching: Batching = Batching(),
    **switches: Any,
) -> tuple[dict[str, Any], Any, Params, Metrics]:
    """One MAML++ meta-update for a user's own loop, at training progress ``epoch``.

    ``meta_params`` and ``buffers`` come from ``mamlpp(apply, loss, inner, **switches).init``;
    ``switches`` are :func:`mamlpp`'s. Returns ``(meta_params, opt_state, buffers,
    metrics)``: the updated version of every state argument, in order, then the metrics
    (the buffers change with BNRS; nothing is modified in place).
    """
    algorithm = mamlpp(apply, loss, inner, batching=batching, **switches)
    state, metrics = step(algorithm, TrainState(meta_params, opt_state, buffers), tasks,
                          optimizer, epoch=epoch)  # fmt: skip
    return state.meta_params, state.opt_state, state.buffers, metrics


def mamlpp_optimizer(
    meta_lr: float = 1e-3, total_steps: int = 100_000, min_lr: float = 1e-5
) -> GradientTransformation:
    """Adam with the meta learning rate cosine-annealed from ``meta_lr`` to ``min_lr`` over
    ``total_steps`` meta-updates (MAML++'s CA)."""
    check_positive_number("mamlpp_optimizer: meta_lr", meta_lr)
    if not 0 <= min_lr <= meta_lr:
        raise ValueError(f"mamlpp_optimizer: min_lr must be in [0, meta_lr], got {min_lr}")
    return adam(cosine_decay(meta_lr, total_steps, alpha=min_lr / meta_lr))
