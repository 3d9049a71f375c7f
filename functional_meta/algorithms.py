"""One uniform face for every algorithm, for loops that do not care which one runs.

The step functions (``maml_step``, ``metasgd_step``, ``reptile_step``, ``mamlpp_step``) keep
each algorithm's natural signature for users who write their own loop. ``fit``, ``evaluate``,
the command line and the distributed step need one shape instead; :class:`MetaLearner` gives
it, built on those same functions:

    learner = MetaLearner("mamlpp", inner_lr=0.1, inner_steps=5)
    state = learner.init(apply, params, buffers, optimizer)       # a TrainState
    grads, metrics, stats = learner.grad(state, tasks, apply=apply, loss=loss, epoch=e)
    state = learner.update(state, grads, stats, optimizer)        # pure
    scores = learner.evaluation_loss(state, apply=apply, loss=loss, steps=10)  # per task

A :class:`TrainState` holds everything a step changes: ``meta_params`` (always a dict with
``"params"`` and, for learned rates, ``"inner_lr"``), the optimizer state and the buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from functional_meta.batching import STRATEGIES, Strategy
from functional_meta.checks import check_inner_steps, check_positive_number
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import LossFn, Params
from functional_meta.losses import maml_loss
from functional_meta.mamlpp import (
    MAMLPlusPlus,
    mamlpp_eval_model,
    mamlpp_grad,
    mamlpp_init,
    per_stage_names,
    update_running_statistics,
)
from functional_meta.model import FunctionalModel
from functional_meta.optim import GradientTransformation
from functional_meta.reptile import reptile_grad
from functional_meta.steps import Metrics, maml_family_grad, meta_update, metasgd_init, summarize
from functional_meta.tree import select_names

__all__ = ["ALGORITHMS", "EvaluationSetup", "MetaLearner", "TrainState"]

ALGORITHMS: tuple[str, ...] = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile")
BatchStats = dict[str, tuple[torch.Tensor, torch.Tensor]] | None


class EvaluationSetup(NamedTuple):
    """How an algorithm adapts at evaluation (see :meth:`MetaLearner.evaluation_setup`)."""

    model: FunctionalModel
    inner_lr: Any
    per_step_lr: bool
    adapted: frozenset[str]
    per_step: frozenset[str]


class TrainState(NamedTuple):
    """Everything a meta-update changes: meta-parameters, optimizer state, buffers."""

    meta_params: dict[str, Any]
    opt_state: Any
    buffers: Params


@dataclass(frozen=True)
class MetaLearner:
    """An algorithm and its inner-loop settings.

    ``algorithm``: ``maml`` (second order), ``fomaml`` (first order), ``anil`` (adapt only
    the parameters whose names start with ``head``), ``metasgd`` (per-weight learned rates
    initialised at ``inner_lr``), ``mamlpp`` (``mamlpp`` switches; its ``inner_steps`` and
    ``inner_lr`` win) or ``reptile`` (``reptile_batch_size`` inner mini-batches,
    ``reptile_use_query`` to adapt on support and query together).
    """

    algorithm: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_clip: float | None = None
    head: str = "head."
    reptile_batch_size: int | None = None
    reptile_use_query: bool = True
    mamlpp: MAMLPlusPlus = field(default_factory=MAMLPlusPlus)
    strategy: Strategy = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {self.algorithm!r}")
        check_positive_number("inner_lr", self.inner_lr)
        check_inner_steps(self.inner_steps)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.algorithm == "mamlpp":
            # MAML++'s own switches carry the inner settings; keep the two views in step.
            config = replace(self.mamlpp, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                             inner_clip=self.inner_clip)  # fmt: skip
            object.__setattr__(self, "mamlpp", config)

    # -- state ---------------------------------------------------------------------------
    def init(
        self,
        apply: FunctionalModel,
        params: Params,
        buffers: Params,
        optimizer: GradientTransformation,
    ) -> TrainState:
        """The initial :class:`TrainState` from a functionalized model's state."""
        if self.algorithm == "mamlpp":
            meta_params, buffers = mamlpp_init(apply, params, buffers, self.mamlpp)
        elif self.algorithm == "metasgd":
            meta_params = metasgd_init(params, self.inner_lr, inner_steps=self.inner_steps,
                                       adapted=self.adapted(params))  # fmt: skip
        else:
            meta_params = {"params": {k: v.clone() for k, v in params.items()}}
        return TrainState(meta_params, optimizer.init(meta_params), dict(buffers))

    def adapted(self, params: Params) -> Callable[[str], bool] | None:
        """The inner loop's parameter filter (ANIL: the head only; None: everything)."""
        if self.algorithm != "anil":
            return None
        if not any(name.startswith(self.head) for name in params):
            raise ValueError(
                f"anil: no parameter name starts with head={self.head!r}; names: {sorted(params)}"
            )
        return lambda name: name.startswith(self.head)

    # -- training ------------------------------------------------------------------------
    def grad(
        self,
        state: TrainState,
        tasks: TaskBatch,
        *,
        apply: FunctionalModel,
        loss: LossFn,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], Metrics, BatchStats]:
        """The meta-gradient (shaped like ``state.meta_params``), metrics and, for MAML++
        with BNRS, the batch statistics to fold into the buffers (else ``None``)."""
        batching = {"strategy": self.strategy, "chunk_size": self.chunk_size}
        meta_params, buffers = state.meta_params, state.buffers
        if self.algorithm == "mamlpp":
            return mamlpp_grad(meta_params, buffers, tasks, apply=apply, loss=loss, epoch=epoch,
                               config=self.mamlpp, **batching)  # fmt: skip
        if self.algorithm == "reptile":
            grads, metrics = reptile_grad(
                meta_params["params"], tasks, apply=apply, buffers=buffers, loss=loss,
                inner_lr=self.inner_lr, inner_steps=self.inner_steps,
                inner_batch_size=self.reptile_batch_size, generator=generator,
                use_query=self.reptile_use_query, inner_clip=self.inner_clip, **batching,
            )  # fmt: skip
            return {"params": grads}, metrics, None
        learned = self.algorithm == "metasgd"
        grads, losses, aux = maml_family_grad(
            meta_params, tasks, apply=apply, buffers=buffers, loss=loss,
            inner_lr=None if learned else self.inner_lr, inner_steps=self.inner_steps,
            first_order=self.algorithm == "fomaml", per_step_lr=learned,
            adapted=sorted(meta_params["inner_lr"]) if learned else self.adapted(meta_params["params"]),
            inner_clip=self.inner_clip, **batching,
        )  # fmt: skip
        return grads, summarize(losses, aux), None

    def update(
        self,
        state: TrainState,
        grads: dict[str, Any],
        batch_stats: BatchStats,
        optimizer: GradientTransformation,
    ) -> TrainState:
        """Apply ``grads`` with ``optimizer`` and fold ``batch_stats`` into the buffers."""
        meta_params, opt_state = meta_update(grads, state.meta_params, state.opt_state, optimizer)
        buffers = state.buffers
        if batch_stats is not None:
            buffers = update_running_statistics(buffers, batch_stats, self.mamlpp.bn_momentum)
        return TrainState(meta_params, opt_state, buffers)

    def step(
        self,
        state: TrainState,
        tasks: TaskBatch,
        *,
        apply: FunctionalModel,
        loss: LossFn,
        optimizer: GradientTransformation,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[TrainState, Metrics]:
        """One meta-update: :meth:`grad` then :meth:`update`."""
        grads, metrics, stats = self.grad(
            state, tasks, apply=apply, loss=loss, epoch=epoch, generator=generator
        )
        return self.update(state, grads, stats, optimizer), metrics

    # -- evaluation ----------------------------------------------------------------------
    def evaluation_setup(
        self, state: TrainState, *, apply: FunctionalModel, steps: int
    ) -> EvaluationSetup:
        """How this algorithm adapts at evaluation, for ``steps`` inner steps: the model (per-
        stage running statistics for MAML++ with BNRS), the rates (learned per-step rates are
        extended with the last step's rate when evaluating with more steps than were trained),
        the adapted parameters and the per-stage names."""
        meta_params = state.meta_params
        model, per_step = apply, frozenset()
        adapted = select_names(meta_params["params"], self.adapted(meta_params["params"]))
        if self.algorithm == "mamlpp":
            model = mamlpp_eval_model(apply, self.mamlpp)
            per_step = per_stage_names(apply, self.mamlpp)
            adapted = frozenset(meta_params["params"]) - per_step
        if "inner_lr" not in meta_params:
            return EvaluationSetup(model, self.inner_lr, False, adapted, per_step)
        rates = {
            name: torch.cat(
                [rate, rate[-1:].expand(max(steps - rate.shape[0], 0), *rate.shape[1:])]
            )
            for name, rate in meta_params["inner_lr"].items()
        }
        return EvaluationSetup(model, rates, True, adapted & frozenset(rates), per_step)

    def evaluation_loss(
        self, state: TrainState, *, apply: FunctionalModel, loss: LossFn, steps: int | None = None
    ) -> Callable[[Params, Task], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The per-task function that evaluation maps over tasks: adapt as
        :meth:`evaluation_setup` says, for ``steps`` inner steps (default: as in training),
        first order, and score the query set.

        ``fn(state.meta_params["params"], task) -> (query_loss [], aux)``. Run it under
        ``torch.no_grad`` (``functional_meta.evaluate`` does), so no outer graph is built.
        """
        steps = self.inner_steps if steps is None else check_inner_steps(steps)
        setup = self.evaluation_setup(state, apply=apply, steps=steps)

        def task_loss(params: Params, task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return maml_loss(
                params, task, apply=setup.model, buffers=state.buffers, loss_fn=loss,
                inner_lr=setup.inner_lr, inner_steps=steps, first_order=True,
                per_step_lr=setup.per_step_lr, adapted=setup.adapted, inner_clip=self.inner_clip,
                per_step=setup.per_step,
            )  # fmt: skip

        return task_loss
