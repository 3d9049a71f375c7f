"""An algorithm as one record of pure functions, and the generic meta-update built from it.

As optax makes an optimizer one record, ``GradientTransformation(init, update)``, an
:class:`Algorithm` is one record of pure functions. Each algorithm module
(``functional_meta.algorithms.*``) builds one from a functional model, a loss, an
:class:`~functional_meta.InnerLoop` and a :class:`~functional_meta.batching.Batching`::

    algorithm = fm.algorithms.maml(apply, F.cross_entropy, fm.InnerLoop(lr=0.4, steps=1))
    state = fm.init_state(algorithm, params, buffers, optimizer)        # a TrainState
    state, metrics = fm.step(algorithm, state, tasks, optimizer)        # one meta-update
    adapted = algorithm.adapt(state.meta_params, state.buffers, support_x, support_y)
    logits = algorithm.predict(adapted, x)                              # inference

Everything above this layer (``fit``, ``evaluate``, checkpoints, the command line, the
class API, ``torch.distributed``) takes a record and never asks which algorithm it is.

Metrics are plain Python numbers: ``loss`` (mean meta-loss over tasks), ``query_loss``,
``accuracy`` (classification), ``support_losses`` (list over inner steps, mean over tasks)
and whatever else an algorithm reports. A non-finite meta-loss, meta-gradient or updated
parameter raises :class:`~functional_meta.validation.NonFiniteError` and nothing is updated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functional_meta import tree
from functional_meta.batching import Batching, chunk_value_and_grad, mean_value_and_grad
from functional_meta.compiling import compiled_or_eager
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import LossFn, Params
from functional_meta.optim import GradientTransformation, adam, apply_updates, cosine_decay
from functional_meta.optim_checks import check_transformation as check_optimizer
from functional_meta.validation import NonFiniteError, all_finite, finite_flag

__all__ = [
    "META_LR_SCHEDULES",
    "Algorithm",
    "Gradient",
    "Metrics",
    "TrainState",
    "adam_meta_optimizer",
    "check_finite",
    "check_transformation",
    "compiled_step",
    "compiles_whole",
    "cosine_meta_optimizer",
    "init_state",
    "keep_buffers",
    "loss_gradient",
    "meta_update",
    "metrics_from",
    "own_loop",
    "step",
    "summarize",
    "summary",
    "update",
]

Metrics = dict[str, float | list[float]]
MetaParams = dict[str, Any]


class TrainState(NamedTuple):
    """Everything a meta-update changes: meta-parameters, optimizer state, buffers."""

    meta_params: MetaParams
    opt_state: Any
    buffers: Params


class Gradient(NamedTuple):
    """What an algorithm's ``grad`` returns for a meta-batch.

    ``grads``: shaped like the meta-parameters; ``metrics``: plain numbers (means over
    tasks); ``statistics``: ``None`` or a pytree of tensors that are means over tasks (so
    that their mean over processes is exact), handed to ``after_update`` (MAML++'s per-stage
    batch statistics).
    """

    grads: MetaParams
    metrics: Metrics
    statistics: Any = None


def keep_buffers(buffers: Params, statistics: Any) -> Params:
    """The ``after_update`` of algorithms that change nothing after the optimizer step."""
    return buffers


def adam_meta_optimizer(meta_lr: float, total_steps: int) -> GradientTransformation:
    """The meta-optimizer most papers use: Adam at ``meta_lr`` (``total_steps`` unused)."""
    return adam(meta_lr)


def cosine_meta_optimizer(meta_lr: float, total_steps: int) -> GradientTransformation:
    """Adam with the rate cosine-annealed from ``meta_lr`` to ``meta_lr / 100`` over
    ``total_steps`` meta-updates and held there after (MAML++'s CA, Antoniou et al. 2019)."""
    return adam(cosine_decay(meta_lr, total_steps, alpha=0.01))


# A run's meta learning rate schedule by name: (meta_lr, total_steps) -> its optimizer.
META_LR_SCHEDULES: dict[str, Callable[[float, int], GradientTransformation]] = {
    "constant": adam_meta_optimizer,
    "cosine": cosine_meta_optimizer,
}


class Algorithm(NamedTuple):
    """One meta-learning algorithm as a record of pure functions.

    Attributes:
        name: the registry name (``"maml"``, ``"reptile"``, ...).
        init: ``init(params, buffers) -> (meta_params, buffers)``: meta-parameters (always a
            dict with ``"params"``, plus e.g. learned rates) from a model's state.
        grad: ``grad(meta_params, buffers, tasks, *, epoch=0.0, generator=None) ->``
            :class:`Gradient`: the meta-gradient of a :class:`TaskBatch` (``epoch``, the
            training progress, for schedules such as MAML++'s; ``generator`` for randomness
            such as Reptile's inner mini-batches). Checks its inputs.
        adapt: ``adapt(meta_params, buffers, support_x [S, ...], support_y [S, ...],
            steps=None)``: what one task's support set makes of the meta-parameters, for
            evaluation and inference (``steps``: inner steps, ``None`` as trained, ``0`` none;
            first order, nothing is kept for an outer derivative).
        predict: ``predict(adapted, x [N, ...]) -> output [N, ...]``.
        after_update: ``after_update(buffers, statistics) -> buffers`` after every optimizer
            step (:func:`keep_buffers` for most algorithms).
        loss: ``loss(prediction, target) -> []``, the task loss (evaluation scores with it).
        model: the functional model (``strategy="auto"`` looks at it).
        batching: how tasks are batched, for training and evaluation.
        inner_steps: the inner steps it trains with (evaluation's default; 0 for an
            algorithm without an inner loop, such as Prototypical Networks).
        extends_steps: whether evaluation may adapt for more steps than training by default
            (``False`` when something was learned per step, e.g. Meta-SGD's rates).
        meta_optimizer: ``meta_optimizer(meta_lr, total_steps)``, the outer optimizer the
            algorithm's paper uses (Adam; MAML++: Adam with a cosine-annealed rate), for
            recipes and the command line.
        objective: ``objective(meta_params, buffers, tasks, *, epoch=0.0, generator=None)
            -> task_loss``: checks its inputs as ``grad`` does and returns the per-task
            loss ``task_loss(meta_params, task) -> (loss [], aux)`` whose mean over tasks
            ``grad`` differentiates (:func:`loss_gradient`); ``None`` where the gradient is
            not such a loss's (Reptile's, iMAML's implicit one). With it, strategy
            ``"compile"`` runs a whole meta-update as one graph (:func:`step`).
    """

    name: str
    init: Callable[[Params, Params], tuple[MetaParams, Params]]
    grad: Callable[..., Gradient]
    adapt: Callable[..., Any]
    predict: Callable[[Any, torch.Tensor], torch.Tensor]
    after_update: Callable[[Params, Any], Params]
    loss: LossFn
    model: Any
    batching: Batching
    inner_steps: int
    extends_steps: bool = True
    meta_optimizer: Callable[[float, int], GradientTransformation] = adam_meta_optimizer
    objective: Callable[..., Callable[[MetaParams, Task], Any]] | None = None


def summarize(losses: torch.Tensor, aux: dict[str, torch.Tensor], *, check: Any = None) -> Metrics:
    """Mean over the task axis of the per-task ``losses [T]`` and every ``aux`` entry
    (``[T]`` becomes a float, ``[T, n]`` a list of ``n`` floats).

    With ``check`` (the meta-gradient's pytree), also raise :class:`NonFiniteError` as
    :func:`check_finite` does, from the same read: one host synchronisation for the check
    and every metric together, not one per metric and per tensor."""
    return metrics_from(summary(losses, aux, check=check).tolist(), losses, aux, check=check)


def summary(
    losses: torch.Tensor, aux: dict[str, torch.Tensor], *, check: Any = None
) -> torch.Tensor:
    """What :func:`summarize` reads, as one vector and without reading it: the means of
    ``losses`` and of every ``aux`` entry, then (with ``check``) whether the losses and
    ``check`` are finite, as ``1.0`` or ``0.0``."""
    means = [losses.mean().reshape(1)] + [v.float().mean(dim=0).reshape(-1) for v in aux.values()]
    if check is not None:
        flag = finite_flag(losses, check)
        means.append(
            torch.ones_like(means[0]) if flag is None else flag.to(means[0].dtype).reshape(1)
        )
    return torch.cat(means)


def metrics_from(
    values: list[float], losses: torch.Tensor, aux: dict[str, torch.Tensor], *, check: Any = None
) -> Metrics:
    """The metrics of :func:`summarize` from the values of :func:`summary` (read once);
    with ``check``, raises :class:`NonFiniteError` when the flag says so."""
    if check is not None and not values[-1]:
        check_finite(losses, check)  # names the culprit (the error path reads again)
    metrics: Metrics = {"loss": values[0]}
    start = 1
    for key, value in aux.items():
        size = value.shape[1:].numel()
        entry = values[start : start + size]
        if value.dim() > 2:  # nested lists, as Tensor.tolist() gives them
            entry = torch.tensor(entry).reshape(value.shape[1:]).tolist()
        metrics[key] = entry if value.dim() > 1 else entry[0]
        start += size
    return metrics


def check_finite(losses: torch.Tensor, grads: Any) -> None:
    """Raise :class:`NonFiniteError` if any task loss or gradient entry is NaN or infinite."""
    if not all_finite(losses, grads):
        where = "meta-loss" if not all_finite(losses) else "meta-gradient"
        raise NonFiniteError(
            f"non-finite {where} (task losses {losses.tolist()}); the parameters were not updated. "
            "Lower the learning rates, clip gradients, or check the data."
        )


def loss_gradient(
    task_loss: Callable[[MetaParams, Task], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    meta_params: MetaParams,
    tasks: TaskBatch,
    batching: Batching,
    model: Any,
) -> Gradient:
    """The :class:`Gradient` of ``(1/T) Σ_i task_loss(meta_params, task_i)``.

    ``task_loss(meta_params, task) -> (loss [], aux)`` is batched as ``batching`` says
    (``functional_meta.batching.mean_value_and_grad``), checked finite, and summarised:
    ``aux["statistics"]``, if present, becomes :attr:`Gradient.statistics` (its mean over
    tasks); every other ``aux`` entry becomes a metric.
    """
    grads, losses, aux = mean_value_and_grad(task_loss, meta_params, tasks, batching, model=model)
    statistics = _pop_statistics(aux)
    metrics = summarize(losses, aux, check=grads)  # raises before anything is returned
    return Gradient(grads, metrics, statistics)


def _pop_statistics(aux: dict[str, Any]) -> Any:
    """``aux["statistics"]`` (removed from ``aux``) as its mean over tasks, or ``None``."""
    statistics = aux.pop("statistics", None)
    return None if statistics is None else tree.map(lambda s: s.mean(dim=0), statistics)


def meta_update(
    grads: Any,
    meta_params: Any,
    opt_state: Any,
    optimizer: GradientTransformation,
    *,
    compiled: bool = False,
) -> tuple[Any, Any]:
    """The optimizer's update applied: ``(new meta_params, new opt_state)``. Raises
    :class:`NonFiniteError` (nothing updated) when the update makes a parameter NaN or
    infinite.

    ``optimizer`` is any gradient transformation of the optax shape: ``init(params)`` and
    ``update(grads, state, params=params) -> (updates, state)``, the updates added to the
    parameters — ``functional_meta.optim``'s, or TorchOpt's (``torchopt.adam(1e-3)``).
    ``compiled`` (strategy ``"compile"``): the update and its finiteness check run as one
    ``torch.compile`` graph where the optimizer traces whole, else eagerly
    (:mod:`functional_meta.compiling`).
    """
    check_transformation(optimizer)
    args = (optimizer, grads, meta_params, opt_state)
    if compiled:
        updated, new_state, finite = compiled_or_eager(
            _optimizer_step, optimizer.update, "the meta-update eagerly for this optimizer",
            *args, fullgraph=True,
        )  # fmt: skip
    else:
        updated, new_state, finite = _optimizer_step(*args)
    if finite is not None and not bool(finite):
        _refuse_update()
    return updated, new_state


def _refuse_update() -> None:
    raise NonFiniteError(
        "the optimizer update made meta-parameters NaN or infinite (finite gradients); "
        "the parameters were not updated. Lower the meta learning rate or check the "
        "optimizer's settings."
    )


def _optimizer_step(
    optimizer: GradientTransformation, grads: Any, meta_params: Any, opt_state: Any
) -> tuple[Any, Any, torch.Tensor | None]:
    """``(updated meta_params, new opt_state, finite flag of the updated)``: pure, so that
    it compiles as one graph."""
    updates, new_state = optimizer.update(grads, opt_state, params=meta_params)
    updated = apply_updates(meta_params, updates)
    return updated, new_state, finite_flag(updated)


def compiles_whole(algorithm: Algorithm) -> bool:
    """Whether :func:`compiled_step` runs ``algorithm``'s meta-updates: strategy
    ``"compile"`` over the whole meta-batch at once, and a loss gradient (``objective``)."""
    batching = algorithm.batching
    return (
        algorithm.objective is not None
        and batching.strategy == "compile"
        and batching.chunk_size is None
    )


def compiled_step(
    algorithm: Algorithm,
    meta_params: MetaParams,
    buffers: Params,
    opt_state: Any,
    tasks: TaskBatch,
    optimizer: GradientTransformation,
    *,
    epoch: float = 0.0,
    generator: torch.Generator | None = None,
    plain: bool = False,
) -> tuple[Any, Any, Params, Metrics]:
    """One meta-update as one ``torch.compile`` graph (:func:`compiles_whole` says when):
    the meta-gradient of ``algorithm.objective`` over every task (``vmap``), the metrics
    and finite flags of :func:`summary`, and the optimizer's step with its finite flag. The
    host reads one vector after the graph, then raises :class:`NonFiniteError` as
    :func:`loss_gradient` and :func:`meta_update` would (nothing is updated), so the
    result equals :func:`loss_gradient` then :func:`meta_update` to float rounding, with
    one graph launch and one read instead of two of each. ``plain``: the optimizer and
    its state act on ``meta_params["params"]`` (``maml_step``'s plain parameter dicts).
    Returns ``(meta_params or its "params" when plain, opt_state, buffers after
    after_update, metrics)``."""
    check_transformation(optimizer)
    task_loss = algorithm.objective(meta_params, buffers, tasks, epoch=epoch, generator=generator)

    def whole(meta: MetaParams, state: Any, tensors: tuple, num_tasks: int) -> tuple:
        grads, (losses, aux) = chunk_value_and_grad(task_loss, meta, tensors, num_tasks, "vmap")
        statistics = _pop_statistics(aux)
        own, own_grads = (meta["params"], grads["params"]) if plain else (meta, grads)
        updated, new_state, finite = _optimizer_step(optimizer, own_grads, own, state)
        flag = torch.ones(1) if finite is None else finite.to(torch.float32).reshape(1)
        read = torch.cat([summary(losses, aux, check=grads).float(), flag.to(losses.device)])
        return updated, new_state, statistics, grads, losses, aux, read

    key = ("step", getattr(task_loss, "__code__", task_loss), optimizer.update)
    what = "the meta-update eagerly (vmap) for this task loss"
    updated, new_state, statistics, grads, losses, aux, read = compiled_or_eager(
        whole, key, what, meta_params, opt_state, tasks.tensors(), len(tasks), fullgraph=True
    )
    values = read.tolist()
    metrics = metrics_from(values[:-1], losses, aux, check=grads)  # raises first
    if not values[-1]:
        _refuse_update()
    return updated, new_state, algorithm.after_update(buffers, statistics), metrics


# The records own_loop's functions built lately, by their arguments, most recent last.
_RECORDS: OrderedDict[tuple, Algorithm] = OrderedDict()
_RECORDS_KEPT = 8


def _record(
    constructor: Callable[..., Algorithm],
    apply: Callable[..., torch.Tensor],
    loss: LossFn,
    inner: Any,
    batching: Batching,
    options: dict[str, Any],
) -> Algorithm:
    """``constructor(apply, loss, inner, batching=batching, **options)``, built once per
    distinct arguments: a loop that calls ``maml_step`` with the same model, loss and
    settings every step validates them and builds the record on the first call only. The
    arguments are immutable settings (``InnerLoop``, ``Batching``) or functions; unhashable
    ones (a list of step weights) build the record on every call, as before."""
    key = (constructor, apply, loss, inner, batching, tuple(sorted(options.items())))
    try:
        algorithm = _RECORDS.get(key)
    except TypeError:  # an unhashable argument
        return constructor(apply, loss, inner, batching=batching, **options)
    if algorithm is None:
        algorithm = constructor(apply, loss, inner, batching=batching, **options)
        _RECORDS[key] = algorithm
        if len(_RECORDS) > _RECORDS_KEPT:
            _RECORDS.popitem(last=False)
    _RECORDS.move_to_end(key)
    return algorithm


def own_loop(
    constructor: Callable[..., Algorithm], *, plain_params: bool
) -> tuple[Callable[..., tuple[Any, Metrics]], Callable[..., tuple[Any, Any, Metrics]]]:
    """An algorithm's ``(grad, step)`` functions for a user's own loop, from its record
    constructor (this is where ``maml_grad``/``maml_step`` and their siblings come from).

    ``grad(meta_params, tasks, *, apply, buffers, loss, inner, batching=Batching(),
    generator=None, **options) -> (grads, metrics)`` builds the record
    ``constructor(apply, loss, inner, batching=batching, **options)`` (once per distinct
    arguments, kept for the next calls) and returns its gradient; with ``plain_params``
    the meta-parameters are a plain parameter dict ``θ`` (the record's ``{"params": θ}``). ``step(meta_params, opt_state, tasks, *, optimizer,
    **grad_options) -> (meta_params, opt_state, metrics)`` applies ``optimizer`` to it.
    Nothing given is modified.
    """

    def gradient_of(
        algorithm: Algorithm, meta_params: Any, buffers: Params, tasks: TaskBatch, generator: Any
    ) -> tuple[Any, Metrics]:
        meta = {"params": meta_params} if plain_params else meta_params
        gradient = algorithm.grad(meta, buffers, tasks, generator=generator)
        return (gradient.grads["params"] if plain_params else gradient.grads), gradient.metrics

    def grad(
        meta_params: Any,
        tasks: TaskBatch,
        *,
        apply: Callable[..., torch.Tensor],
        buffers: Params,
        loss: LossFn,
        inner: Any,
        batching: Batching = Batching(),
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> tuple[Any, Metrics]:
        algorithm = _record(constructor, apply, loss, inner, batching, options)
        return gradient_of(algorithm, meta_params, buffers, tasks, generator)

    def step(
        meta_params: Any,
        opt_state: Any,
        tasks: TaskBatch,
        *,
        optimizer: GradientTransformation,
        apply: Callable[..., torch.Tensor],
        buffers: Params,
        loss: LossFn,
        inner: Any,
        batching: Batching = Batching(),
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> tuple[Any, Any, Metrics]:
        algorithm = _record(constructor, apply, loss, inner, batching, options)
        if compiles_whole(algorithm):
            meta = {"params": meta_params} if plain_params else meta_params
            meta_params, opt_state, _, metrics = compiled_step(
                algorithm, meta, buffers, opt_state, tasks, optimizer, generator=generator,
                plain=plain_params,
            )  # fmt: skip
            return meta_params, opt_state, metrics
        grads, metrics = gradient_of(algorithm, meta_params, buffers, tasks, generator)
        meta_params, opt_state = meta_update(
            grads, meta_params, opt_state, optimizer,
            compiled=algorithm.batching.strategy == "compile",
        )  # fmt: skip
        return meta_params, opt_state, metrics

    return grad, step


def check_transformation(optimizer: Any) -> None:
    """``optimizer`` must have the optax shape (``init`` and ``update``); a ``torch.optim``
    optimizer, which keeps its own state on leaf tensors, is refused with the way to use it."""
    check_optimizer(
        optimizer,
        "optimizer",
        "take the meta-gradient from maml_grad (or metasgd_grad, reptile_grad, "
        "algorithm.grad), hand it over with functional_meta.optim.assign_grads(parameters, "
        "grads) and call optimizer.step()",
    )


def init_state(
    algorithm: Algorithm, params: Params, buffers: Params, optimizer: GradientTransformation
) -> TrainState:
    """The initial :class:`TrainState` of ``algorithm`` from a functionalized model's state
    (``optimizer``: see :func:`meta_update`)."""
    check_transformation(optimizer)
    for name, value in (("params", params), ("buffers", buffers)):
        if not isinstance(value, dict):
            raise TypeError(
                f"{name}: expected a dict of tensors (from functionalize), got {type(value).__name__}"
            )
    meta_params, buffers = algorithm.init(params, buffers)
    return TrainState(meta_params, optimizer.init(meta_params), dict(buffers))


def update(
    algorithm: Algorithm, state: TrainState, gradient: Gradient, optimizer: GradientTransformation
) -> TrainState:
    """Apply ``gradient`` with ``optimizer``, then the algorithm's ``after_update``."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState from init_state, got {type(state).__name__}")
    meta_params, opt_state = meta_update(
        gradient.grads,
        state.meta_params,
        state.opt_state,
        optimizer,
        compiled=algorithm.batching.strategy == "compile",
    )
    return TrainState(
        meta_params, opt_state, algorithm.after_update(state.buffers, gradient.statistics)
    )


def step(
    algorithm: Algorithm,
    state: TrainState,
    tasks: TaskBatch,
    optimizer: GradientTransformation,
    *,
    epoch: float = 0.0,
    generator: torch.Generator | None = None,
    gradient: Callable[..., Gradient] | None = None,
) -> tuple[TrainState, Metrics]:
    """One meta-update of any algorithm: its gradient then :func:`update`. Pure: returns
    ``(new_state, metrics)`` and modifies nothing. ``gradient`` (default ``algorithm.grad``)
    is called as ``algorithm.grad`` is, e.g. ``distributed.data_parallel(algorithm.grad)``."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState from init_state, got {type(state).__name__}")
    if gradient is None and compiles_whole(algorithm):
        meta_params, opt_state, buffers, metrics = compiled_step(
            algorithm, state.meta_params, state.buffers, state.opt_state, tasks, optimizer,
            epoch=epoch, generator=generator,
        )  # fmt: skip
        return TrainState(meta_params, opt_state, buffers), metrics
    gradient = (gradient or algorithm.grad)(
        state.meta_params, state.buffers, tasks, epoch=epoch, generator=generator
    )
    return update(algorithm, state, gradient, optimizer), gradient.metrics
