"""MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML"), every fix a switch.

:class:`MAMLPlusPlus` holds the switches; its defaults turn every component on:

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
  :func:`update_running_statistics` folds them into the buffers with momentum. The buffers
  are never written in place. Evaluation normalises with batch statistics too by default,
  as the authors' code did (it kept the running statistics but called batch norm with
  ``training=True`` at test time as well). With ``eval_running_stats=True``
  (:func:`mamlpp_eval_model`) the stage-``s`` running statistics *replace* batch
  statistics, so a query prediction depends only on its own example and the support set;
  measured on Omniglot 5-way 1-shot, a model trained with per-task batch statistics then
  falls to chance (docs/algorithms/mamlpp.md), so this is not the default.
- **CA**, cosine annealing of the meta learning rate: :func:`mamlpp_optimizer`.

The stage convention: the support forward of inner step ``t`` is stage ``t``; the query
forward after ``k`` steps is stage ``k``. Evaluation with more steps than training reuses
the last stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from functional_meta.batching import Strategy
from functional_meta.checks import check_inner_steps, check_positive_number
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import LossFn, Params
from functional_meta.losses import msl_weights
from functional_meta.model import FunctionalModel
from functional_meta.optim import GradientTransformation, adam, cosine_decay
from functional_meta.steps import Metrics, maml_family_grad, meta_update, summarize

__all__ = [
    "MAMLPlusPlus",
    "mamlpp_eval_model",
    "mamlpp_grad",
    "mamlpp_init",
    "mamlpp_optimizer",
    "mamlpp_step",
    "per_stage_names",
    "update_running_statistics",
]


@dataclass(frozen=True)
class MAMLPlusPlus:
    """The MAML++ switches (defaults: everything on)."""

    inner_steps: int = 5
    inner_lr: float = 0.1
    multi_step_loss: bool = True
    msl_anneal_epochs: float = 10.0
    first_order_epochs: float = 50.0
    learn_inner_lr: bool = True
    per_step_bn_weights: bool = True
    per_step_bn_stats: bool = True
    bn_momentum: float = 0.1
    eval_running_stats: bool = False
    inner_clip: float | None = None

    def __post_init__(self) -> None:
        check_inner_steps(self.inner_steps)
        check_positive_number("MAMLPlusPlus.inner_lr", self.inner_lr)
        check_positive_number("MAMLPlusPlus.msl_anneal_epochs", self.msl_anneal_epochs)
        if not (self.first_order_epochs >= 0 and math.isfinite(self.first_order_epochs)):
            raise ValueError(
                f"MAMLPlusPlus.first_order_epochs: expected a finite number >= 0, got {self.first_order_epochs}"
            )
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(
                f"MAMLPlusPlus.bn_momentum: expected a number in (0, 1], got {self.bn_momentum}"
            )
        if self.inner_clip is not None:
            check_positive_number("MAMLPlusPlus.inner_clip", self.inner_clip)


def _check_model(apply: Any) -> FunctionalModel:
    if not isinstance(apply, FunctionalModel):
        raise TypeError(
            "apply: MAML++ needs the FunctionalModel returned by functionalize (to find its "
            f"batch-norm layers), got {type(apply).__name__}"
        )
    return apply


def per_stage_names(apply: FunctionalModel, config: MAMLPlusPlus) -> frozenset[str]:
    """The parameter and buffer names that carry a stage axis under ``config``."""
    names: set[str] = set()
    for layer in _check_model(apply).batch_norm_layers:
        if config.per_step_bn_weights:
            names |= {f"{layer}.weight", f"{layer}.bias"} & apply.param_names
        if config.per_step_bn_stats:
            names |= {f"{layer}.running_mean", f"{layer}.running_var"} & apply.buffer_names
    return frozenset(names)


def mamlpp_init(
    apply: FunctionalModel, params: Params, buffers: Params, config: MAMLPlusPlus = MAMLPlusPlus()
) -> tuple[dict[str, Any], Params]:
    """MAML++'s meta-parameters and buffers from a functionalized model's.

    The batch-norm switches (BNWB, BNRS) apply to the model's batch-norm layers and are
    no-ops for a model without any.

    Returns ``({"params": θ, "inner_lr": α}, buffers)``: per-stage names (BNWB, BNRS)
    repeated along a new leading axis of ``inner_steps + 1`` stages; ``α[name]`` a
    ``[inner_steps]`` vector at ``config.inner_lr`` for every adapted parameter (with LSLR;
    without it, ``meta_params`` has no ``"inner_lr"`` and the fixed rate is used).
    """
    apply.check(params, buffers)
    untracked = [n for n in apply.batch_norm_layers if f"{n}.running_mean" not in buffers]
    if config.per_step_bn_stats and untracked:
        raise ValueError(
            f"mamlpp_init: per_step_bn_stats needs running statistics, but batch-norm layers {untracked} "
            "were built with track_running_stats=False"
        )
    staged = per_stage_names(apply, config)
    stages = config.inner_steps + 1

    def expand(tensors: Params) -> Params:
        return {
            name: value.unsqueeze(0).repeat(stages, *([1] * value.dim()))
            if name in staged
            else value.clone()
            for name, value in tensors.items()
        }

    meta_params: dict[str, Any] = {"params": expand(params)}
    if config.learn_inner_lr:
        meta_params["inner_lr"] = {
            name: torch.full(
                (config.inner_steps,), config.inner_lr, dtype=value.dtype, device=value.device
            )
            for name, value in params.items()
            if name not in staged
        }
    return meta_params, expand(buffers)


def mamlpp_grad(
    meta_params: dict[str, Any],
    buffers: Params,
    tasks: TaskBatch,
    *,
    apply: FunctionalModel,
    loss: LossFn,
    epoch: float,
    config: MAMLPlusPlus = MAMLPlusPlus(),
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[dict[str, Any], Metrics, dict[str, tuple[torch.Tensor, torch.Tensor]] | None]:
    """The MAML++ meta-gradient at training progress ``epoch`` (a float; MSL and DA are
    functions of it). Returns ``(grads, metrics, batch_stats)``: ``batch_stats`` are the
    per-stage batch-norm statistics averaged over tasks (``None`` without BNRS), to be folded
    into the buffers by :func:`update_running_statistics`. ``metrics["first_order"]`` says
    which derivative order DA chose."""
    if not (isinstance(epoch, int | float) and epoch >= 0 and math.isfinite(epoch)):
        raise ValueError(f"epoch: expected a finite number >= 0, got {epoch!r}")
    staged = per_stage_names(apply, config)
    first_order = epoch < config.first_order_epochs
    grads, losses, aux = maml_family_grad(
        meta_params,
        tasks,
        apply=apply,
        buffers=buffers,
        loss=loss,
        inner_lr=None if config.learn_inner_lr else config.inner_lr,
        inner_steps=config.inner_steps,
        first_order=first_order,
        per_step_lr=config.learn_inner_lr,
        step_weights=(
            msl_weights(epoch, config.inner_steps, config.msl_anneal_epochs)
            if config.multi_step_loss and epoch < config.msl_anneal_epochs
            else None
        ),
        adapted=lambda name: name not in staged,
        inner_clip=config.inner_clip,
        per_step=staged,
        collect_batch_stats=config.per_step_bn_stats,
        strategy=strategy,
        chunk_size=chunk_size,
    )
    stats = aux.pop("batch_stats", None)
    batch_stats = (
        None if stats is None else {k: (m.mean(0), v.mean(0)) for k, (m, v) in stats.items()}
    )
    metrics = summarize(losses, aux)
    metrics["first_order"] = float(first_order)
    return grads, metrics, batch_stats


def update_running_statistics(
    buffers: Params, batch_stats: dict[str, tuple[torch.Tensor, torch.Tensor]], momentum: float
) -> Params:
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
    config: MAMLPlusPlus = MAMLPlusPlus(),
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> tuple[dict[str, Any], Any, Params, Metrics]:
    """One MAML++ meta-update. Returns ``(meta_params, opt_state, buffers, metrics)``: the
    buffers change too when BNRS is on (nothing is modified in place)."""
    grads, metrics, batch_stats = mamlpp_grad(
        meta_params, buffers, tasks, apply=apply, loss=loss, epoch=epoch,
        config=config, strategy=strategy, chunk_size=chunk_size,
    )  # fmt: skip
    meta_params, opt_state = meta_update(grads, meta_params, opt_state, optimizer)
    if batch_stats is not None:
        buffers = update_running_statistics(buffers, batch_stats, config.bn_momentum)
    return meta_params, opt_state, buffers, metrics


def mamlpp_eval_model(
    apply: FunctionalModel, config: MAMLPlusPlus = MAMLPlusPlus()
) -> FunctionalModel:
    """The model to evaluate with: normalising with the per-stage running statistics when
    ``config.per_step_bn_stats`` and ``config.eval_running_stats``, else ``apply`` (batch
    statistics, as in training)."""
    if config.per_step_bn_stats and config.eval_running_stats:
        return _check_model(apply).using("running")
    return apply


def mamlpp_optimizer(
    meta_lr: float = 1e-3, total_steps: int = 100_000, min_lr: float = 1e-5
) -> GradientTransformation:
    """Adam with the meta learning rate cosine-annealed from ``meta_lr`` to ``min_lr`` over
    ``total_steps`` meta-updates (MAML++'s CA)."""
    check_positive_number("mamlpp_optimizer: meta_lr", meta_lr)
    if not 0 <= min_lr <= meta_lr:
        raise ValueError(f"mamlpp_optimizer: min_lr must be in [0, meta_lr], got {min_lr}")
    return adam(cosine_decay(meta_lr, total_steps, alpha=min_lr / meta_lr))
