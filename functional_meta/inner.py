"""The one inner loop: differentiable adaptation on a task's support set.

Every algorithm that adapts does so through :func:`adapt`, configured by one
:class:`InnerLoop` that is validated once, when it is built. For ``t = 0 .. steps-1``
(Finn et al. 2017, eq. 1, generalised):

    θ_{t+1} = θ_t − α(name, t) ⊙ clip(∇_θ L_support(θ_t))

over the adapted subset of parameters (all of them for MAML, the head for ANIL). The rate
``α(name, t)`` is ``InnerLoop.lr`` unless the algorithm passes its meta-learned ``rates``
(Meta-SGD: one rate per weight, Li et al. 2017; MAML++ LSLR: one per parameter tensor and
step, Antoniou et al. 2019).

**Inner optimizers.** With ``InnerLoop(optimizer=opt)``, ``opt`` a gradient transformation
of ``functional_meta.optim`` (e.g. ``optim.sgd(0.01, momentum=0.9)``, ``optim.adam(1e-2)``),
the step is instead

    u_t, s_{t+1} = opt.update(clip(∇_θ L_support(θ_t)), s_t, params=θ_t),   s_0 = opt.init(θ_0)
    θ_{t+1} = θ_t + u_t

with the optimizer's own learning rate. The state ``s`` (momentum buffers, Adam's moments)
is made per task, inside the per-task function, so it batches under ``vmap``; it is part of
the differentiated graph, so the second-order meta-gradient flows through it.
``optim.sgd(lr)`` gives exactly the plain step at rate ``lr``. Meta-learned rates scale the
plain SGD step, so ``rates`` together with an optimizer is refused (Meta-SGD and MAML++'s
LSLR refuse an inner optimizer when they are built).

Each inner gradient is taken by ``functional_meta.autodiff.grad_and_value``: with
``torch.func.grad_and_value`` inside ``torch.func`` transforms, so the loop composes with an
outer ``grad`` (second-order MAML: the inner gradient stays differentiable) and with
``vmap`` over tasks; with ``torch.autograd`` (``create_graph`` unless first order) in the
task loop. ``first_order=True`` detaches the inner gradients (FOMAML: the meta-gradient is
then the query gradient at the adapted parameters); an optimizer's state is then built from
detached gradients too, and only what it computes from the parameters themselves (weight
decay) stays differentiable.

**Stages.** Every forward has a *stage*: the support forward of inner step ``t`` is stage
``t``, a forward after ``k`` steps (the query) is stage ``k``. A plain model ignores it. An
algorithm whose model changes with the stage (MAML++'s per-step batch norm) gives the
:class:`InnerLoop` a ``forward`` hook ``forward(apply, params, buffers, x, stage) ->
(prediction, report)``; whatever it reports (a dict, e.g. the batch statistics it saw; ``{}``
for nothing) is returned per support step in :attr:`Adaptation.reports`. The core knows nothing else about stages.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from functional_meta import tree
from functional_meta.autodiff import grad_and_value
from functional_meta.optim import GradientTransformation, apply_updates
from functional_meta.optim_checks import check_transformation
from functional_meta.validation import check_count, check_positive_number

__all__ = [
    "Adaptation",
    "Apply",
    "Forward",
    "InnerLoop",
    "LossFn",
    "Params",
    "Rates",
    "adapt",
    "clip_by_global_norm",
]

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Apply = Callable[[Params, Params, torch.Tensor], torch.Tensor]
Selection = Collection[str] | Callable[[str], bool] | None
Rates = Callable[[str, int], float | torch.Tensor]
"""``rates(name, t)``: the inner rate of parameter ``name`` at step ``t`` (a number, or a
tensor that broadcasts against the parameter)."""

# What to use instead of a torch.optim optimizer as InnerLoop.optimizer.
_FUNCTIONAL_INSTEAD = (
    "the inner loop cannot differentiate through it: use a functional_meta.optim "
    "transformation, e.g. optim.sgd(0.01, momentum=0.9) or optim.adam(1e-2)"
)


class Forward(Protocol):
    """The hook that runs the model at a stage: ``(prediction, report)``, ``report`` a dict
    of tensors (``{}``: nothing to report)."""

    def __call__(
        self, apply: Apply, params: Params, buffers: Params, x: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


def plain_forward(
    apply: Apply, params: Params, buffers: Params, x: torch.Tensor, stage: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The model as it is, whatever the stage; nothing to report."""
    return apply(params, buffers, x), {}


def _selection(value: Selection) -> Selection:
    if value is None or callable(value):
        return value
    if isinstance(value, str) or not isinstance(value, Collection):
        raise TypeError(
            "InnerLoop.adapted: expected None, a collection of parameter names or a predicate "
            f"on the name, got {value!r}"
        )
    return frozenset(value)


@dataclass(frozen=True)
class InnerLoop:
    """How a task adapts: one object, validated once, passed whole.

    Attributes:
        lr: the rate α of the plain SGD step (a positive number, default 0.01;
            meta-learned rates, where an algorithm has them, start from it). Not given
            with ``optimizer``, which has its own (``lr`` is then ``None``).
        steps: inner steps on the support set (>= 1).
        first_order: drop the second-order term (detach the inner gradients).
        adapted: which parameters move: ``None`` (all), names, or a predicate on the name
            (ANIL: ``lambda name: name.startswith("head.")``).
        clip: clip each inner gradient to this global norm (``None``: no clipping).
        forward: how the model runs at a stage (see the module docstring; default: as is).
        optimizer: the inner update, a differentiable gradient transformation of
            ``functional_meta.optim`` (``None``: plain SGD at ``lr``; see the module
            docstring). ``torch.optim`` optimizers are refused: they update in place.
    """

    lr: float | None = None
    steps: int = 1
    first_order: bool = False
    adapted: Selection = None
    clip: float | None = None
    forward: Forward = field(default=plain_forward, repr=False)
    optimizer: GradientTransformation | None = None

    def __post_init__(self) -> None:
        if self.optimizer is None:
            lr = 0.01 if self.lr is None else self.lr
            object.__setattr__(self, "lr", check_positive_number("InnerLoop.lr", lr))
        else:
            check_transformation(self.optimizer, "InnerLoop.optimizer", _FUNCTIONAL_INSTEAD)
            if self.lr is not None:
                raise ValueError(
                    f"InnerLoop.lr: the inner optimizer has its own learning rate; give lr "
                    f"(got {self.lr!r}) only for the plain SGD step"
                )
        check_count("InnerLoop.steps", self.steps)
        if not isinstance(self.first_order, bool):
            raise TypeError(f"InnerLoop.first_order: expected a bool, got {self.first_order!r}")
        if self.clip is not None:
            object.__setattr__(self, "clip", check_positive_number("InnerLoop.clip", self.clip))
        object.__setattr__(self, "adapted", _selection(self.adapted))
        if not callable(self.forward):
            raise TypeError(f"InnerLoop.forward: expected a callable, got {self.forward!r}")

    def adapted_names(self, params: Mapping[str, torch.Tensor]) -> frozenset[str]:
        """The names in ``params`` that the inner loop moves (``KeyError`` for unknown
        names, ``ValueError`` when the selection is empty)."""
        try:
            return tree.select_names(dict(params), self.adapted)
        except (KeyError, ValueError) as error:
            raise type(error)(f"InnerLoop.adapted: {error.args[0]}") from None

    def constant_rate(self, name: str, step: int) -> float:
        """The fixed rate ``lr`` for every parameter and step (the default ``rates``)."""
        return self.lr

    def refuse_optimizer(self, who: str) -> None:
        """``ValueError`` naming ``who`` when this loop has an ``optimizer``: for inner
        rates that are meta-learned, which scale the plain SGD step."""
        if self.optimizer is not None:
            raise ValueError(
                f"{who}: InnerLoop.optimizer: meta-learned inner rates scale the plain SGD "
                "step and do not combine with an inner optimizer; use InnerLoop(lr=...) "
                "without one (or an algorithm without learned rates: maml, anil, reptile)"
            )


class Adaptation(NamedTuple):
    """What :func:`adapt` returns.

    ``params``: every parameter, the adapted ones replaced by ``θ_steps``.
    ``support_losses [steps]``: ``L_support(θ_t)`` for ``t = 0 .. steps-1``.
    ``trace``: ``after_step(θ_{t+1}, t+1)`` for each step (empty without ``after_step``).
    ``reports``: what the ``forward`` hook reported at each support forward (empty when it
    reports nothing).
    """

    params: Params
    support_losses: torch.Tensor
    trace: list[Any]
    reports: list[Any]


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """``grads`` scaled by ``min(1, max_norm / (‖grads‖ + 1e-6))`` (differentiable)."""
    factor = torch.clamp(max_norm / (tree.global_norm(grads) + 1e-6), max=1.0)
    return tree.scale(factor, grads)


def adapt(
    apply: Apply,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: LossFn,
    inner: InnerLoop,
    *,
    rates: Rates | None = None,
    minibatches: torch.Tensor | None = None,
    after_step: Callable[[Params, int], Any] | None = None,
) -> Adaptation:
    """Adapt ``params`` to one task's support set ``x [S, ...]``, ``y [S, ...]`` (``x`` may
    be a tuple or dict of inputs for a model ``forward(*x)``/``forward(**x)``).

    ``apply(params, buffers, x)`` is the functional model and ``loss(prediction, y)`` a
    scalar loss; ``inner`` says how (rate or optimizer, steps, order, adapted names,
    clipping, stages). ``rates(name, t)`` replaces ``inner.lr`` with meta-learned rates (not
    with ``inner.optimizer``: ``ValueError``). ``minibatches
    [steps, B]`` (integer indices into the ``S`` examples), if given, makes step ``t`` use
    only ``x[minibatches[t]]`` (Reptile's inner mini-batches; sample them outside ``vmap``,
    they are shared by all tasks). ``after_step(θ_{t+1}, t+1)`` is evaluated after every
    step and collected in :attr:`Adaptation.trace` (MAML++'s multi-step loss uses it).

    Pure and transform-friendly: no input is modified. Value checks cannot run inside
    ``vmap``, so the settings are validated when ``inner`` is built and the tensors at the
    public boundary (``functional_meta.checks``).
    """
    if rates is not None:
        inner.refuse_optimizer("adapt: rates")
    rate = inner.constant_rate if rates is None else rates
    names = inner.adapted_names(params)
    fast = {name: params[name] for name in names}
    frozen = {name: value for name, value in params.items() if name not in names}
    opt_state = None if inner.optimizer is None else inner.optimizer.init(fast)
    support_losses, trace, reports = [], [], []
    for t in range(inner.steps):
        x_t, y_t = x, y
        if minibatches is not None:  # x may be a tuple or dict of inputs
            x_t, y_t = tree.map(lambda v, i=minibatches[t]: v[i], (x, y))

        def support_loss(fast_params: Params, t: int = t, x_t=x_t, y_t=y_t) -> tuple:
            prediction, report = inner.forward(apply, {**frozen, **fast_params}, buffers, x_t, t)
            return loss(prediction, y_t), report

        grads, (value, report) = grad_and_value(
            support_loss, fast, create_graph=not inner.first_order
        )
        if report:
            reports.append(report)
        if inner.first_order:
            grads = tree.detach(grads)
        if inner.clip is not None:
            grads = clip_by_global_norm(grads, inner.clip)
        if inner.optimizer is None:
            fast = {name: fast[name] - rate(name, t) * grads[name] for name in fast}
        else:
            updates, opt_state = inner.optimizer.update(grads, opt_state, params=fast)
            fast = apply_updates(fast, updates)
        support_losses.append(value)
        if after_step is not None:
            trace.append(after_step({**frozen, **fast}, t + 1))
    return Adaptation({**frozen, **fast}, torch.stack(support_losses), trace, reports)
