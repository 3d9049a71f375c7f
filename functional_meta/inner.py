"""The one inner loop: differentiable SGD adaptation on a task's support set.

Every algorithm adapts through :func:`adapt`. For ``t = 0 .. steps-1`` (Finn et al. 2017,
eq. 1, generalised):

    θ_{t+1} = θ_t − α_t ⊙ clip(∇_θ L_support(θ_t))

over the adapted subset of parameters (all of them for MAML, the head for ANIL), where the
learning rate ``α_t`` is

- a number (MAML): the same scalar for every parameter and step;
- a dict ``{name: tensor}`` broadcastable to each parameter (Meta-SGD, Li et al. 2017: one
  rate per weight; MAML++ LSLR with 0-d tensors: one rate per parameter tensor);
- with ``per_step_lr=True``, the tensor (or the dict's tensors) carries a leading step axis
  and ``α_t`` is slice ``t`` (MAML++ per-step per-layer rates, per-step Meta-SGD).

Each inner gradient is taken by ``functional_meta.autodiff.grad_and_value``: with
``torch.func.grad_and_value`` inside ``torch.func`` transforms, so the loop composes with an
outer ``grad`` (second-order MAML: the inner gradient stays differentiable) and with
``vmap`` over tasks; with ``torch.autograd`` (``create_graph`` unless first order) in the
task loop, which does the same math with less per-operator overhead.
``first_order=True`` detaches the inner gradients (FOMAML: the meta-gradient is then the
query gradient at the adapted parameters).

Per-stage tensors (MAML++ BNWB/BNRS): names listed in ``per_step`` hold a leading axis over
*stages*; the forward at stage ``s`` uses slice ``min(s, len - 1)``. The support forward of
inner step ``t`` is stage ``t``; a forward after ``k`` steps (the query) is stage ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import torch

from functional_meta import tree
from functional_meta.autodiff import grad_and_value

__all__ = ["Adaptation", "LearningRate", "adapt", "at_stage", "clip_by_global_norm", "forward"]

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LearningRate = float | torch.Tensor | Mapping[str, torch.Tensor]


class Adaptation(NamedTuple):
    """What :func:`adapt` returns.

    ``params``: every parameter, the adapted ones replaced by ``θ_steps``.
    ``support_losses [steps]``: ``L_support(θ_t)`` for ``t = 0 .. steps-1``.
    ``trace``: the list of ``after_step(θ_{t+1}, t+1)`` for ``t = 0 .. steps-1`` (empty
    without ``after_step``).
    ``support_statistics``: with ``support_statistics=True``, the list over steps of the
    batch-norm statistics each inner step's support forward saw (stage ``t`` for step
    ``t``; see ``FunctionalModel.with_statistics``), else an empty list.
    """

    params: Params
    support_losses: torch.Tensor
    trace: list[Any]
    support_statistics: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]


def at_stage(tensors: Mapping[str, torch.Tensor], per_step: Collection[str], stage: int) -> Params:
    """``tensors`` with each name in ``per_step`` replaced by its slice for ``stage``."""
    if not per_step:
        return dict(tensors)
    return {
        name: value[min(stage, value.shape[0] - 1)] if name in per_step else value
        for name, value in tensors.items()
    }


def forward(
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    *,
    statistics: bool = False,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(apply(params, buffers, x), seen)``: ``seen`` holds the batch-norm statistics of that
    forward (``FunctionalModel.with_statistics``) when ``statistics`` is true, else ``{}``."""
    if statistics:
        return apply.with_statistics(params, buffers, x)
    return apply(params, buffers, x), {}


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """``grads`` scaled by ``min(1, max_norm / (‖grads‖ + 1e-6))`` (differentiable)."""
    factor = torch.clamp(max_norm / (tree.global_norm(grads) + 1e-6), max=1.0)
    return tree.scale(factor, grads)


def _rate(lr: LearningRate, name: str, step: int, per_step_lr: bool) -> float | torch.Tensor:
    rate = lr[name] if isinstance(lr, Mapping) else lr
    return rate[step] if per_step_lr else rate


def adapt(
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    lr: LearningRate,
    steps: int,
    first_order: bool = False,
    per_step_lr: bool = False,
    adapted: Collection[str] | None = None,
    clip_norm: float | None = None,
    per_step: Collection[str] = (),
    minibatches: torch.Tensor | None = None,
    after_step: Callable[[Params, int], Any] | None = None,
    support_statistics: bool = False,
) -> Adaptation:
    """Adapt ``params`` to one task's support set ``x [S, ...]``, ``y [S, ...]``.

    ``apply(params, buffers, x)`` is the functional model and ``loss_fn(prediction, y)`` a
    scalar loss. ``adapted`` names the parameters that move (default: all); the others are
    used as they are. ``clip_norm`` clips each inner gradient to that global norm.
    ``minibatches [steps, B]`` (integer indices into the ``S`` examples), if given, makes
    step ``t`` use only ``x[minibatches[t]]`` (Reptile's inner mini-batches); the indices
    are shared by all tasks of a batch, so sample them outside ``vmap``.
    ``after_step(params_{t+1}, t+1)``, if given, is evaluated after every step and its
    results are returned in ``Adaptation.trace`` (MAML++'s multi-step loss uses it).
    ``support_statistics=True`` (``apply`` a ``FunctionalModel``) also returns the batch-norm
    statistics of every support forward, taken from the forward itself (MAML++ BNRS).

    Pure and transform-friendly: no input is modified, and the inputs are expected to have
    been validated by the caller (see ``functional_meta.checks``), since value checks do not
    run inside ``vmap``.
    """
    names = frozenset(params) if adapted is None else frozenset(adapted)
    fast = {name: params[name] for name in names}
    frozen = {name: value for name, value in params.items() if name not in names}
    support_losses, trace, statistics = [], [], []
    for t in range(steps):
        x_t, y_t = (x, y) if minibatches is None else (x[minibatches[t]], y[minibatches[t]])

        def support_loss(fast_params: Params, t: int = t, x_t=x_t, y_t=y_t) -> tuple:
            current = at_stage({**frozen, **fast_params}, per_step, t)
            state = at_stage(buffers, per_step, t)
            prediction, seen = forward(apply, current, state, x_t, statistics=support_statistics)
            return loss_fn(prediction, y_t), seen

        grads, (loss, seen) = grad_and_value(support_loss, fast, create_graph=not first_order)
        if support_statistics:
            statistics.append(seen)
        if first_order:
            grads = tree.detach(grads)
        if clip_norm is not None:
            grads = clip_by_global_norm(grads, clip_norm)
        fast = {name: fast[name] - _rate(lr, name, t, per_step_lr) * grads[name] for name in fast}
        support_losses.append(loss)
        if after_step is not None:
            trace.append(after_step({**frozen, **fast}, t + 1))
    return Adaptation({**frozen, **fast}, torch.stack(support_losses), trace, statistics)
