"""Checks of tasks and models at the public boundary (never inside ``vmap``).

Settings are validated once, where they are built (:class:`~functional_meta.InnerLoop`,
:class:`~functional_meta.batching.Batching`, the algorithm constructors). What changes
from call to call is checked here: the task batch, the meta-parameters against the model,
and the model's output against the loss. The probe forward that finds whether a model
can take a task batch at all, and whether the loss can score what it returns, runs once
per model, loss and shape signature, not on every step.
Each check raises ``TypeError``/``ValueError``/``KeyError`` naming the argument, what it got
and what was expected.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import optree
import torch

from functional_meta import tree
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import Forward, LossFn, Params, plain_forward
from functional_meta.model import FunctionalModel

__all__ = [
    "check_algorithm_parts",
    "check_loss",
    "check_meta_batch",
    "check_meta_params",
    "check_model_fits_tasks",
    "check_rates",
    "check_support_set",
    "check_tasks",
]

# model -> {(parameter, buffer, task) shape signature: its output's class count or None}.
_PROBED: weakref.WeakKeyDictionary[Any, dict[tuple, int | None]] = weakref.WeakKeyDictionary()


def check_algorithm_parts(model: Any, loss: Any, inner: Any, batching: Any) -> None:
    """What every algorithm constructor is built from: a callable ``model``
    (``apply(params, buffers, x)``), a callable ``loss``, an :class:`InnerLoop` and a
    :class:`~functional_meta.batching.Batching` (checked before any of them is used)."""
    from functional_meta.batching import Batching
    from functional_meta.inner import InnerLoop

    for name, value in (("model", model), ("loss", loss)):
        if not callable(value):
            raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")
    if not isinstance(inner, InnerLoop):
        raise TypeError(
            f"inner: expected an InnerLoop (e.g. InnerLoop(lr=0.4, steps=1)), got {type(inner).__name__}"
        )
    if not isinstance(batching, Batching):
        raise TypeError(
            f"batching: expected a Batching (e.g. Batching('vmap')), got {type(batching).__name__}"
        )


def check_tasks(tasks: Any) -> TaskBatch:
    """``tasks`` must be a non-empty :class:`TaskBatch` (validated when it was built)."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(
            f"tasks: expected a TaskBatch (support_x [T,S,...], support_y [T,S], query_x [T,Q,...], "
            f"query_y [T,Q]), got {type(tasks).__name__}"
        )
    if len(tasks) == 0:
        raise ValueError("tasks: the meta-batch is empty (T = 0); expected at least one task")
    return tasks


def check_meta_params(meta_params: Any, keys: frozenset[str]) -> None:
    """``meta_params`` must be a dict with exactly ``keys`` (each a dict of tensors)."""
    if not isinstance(meta_params, dict) or meta_params.keys() != keys:
        got = sorted(meta_params) if isinstance(meta_params, dict) else type(meta_params).__name__
        raise TypeError(
            f"meta_params: expected a dict with keys {sorted(keys)} (as the algorithm's init "
            f"makes it), got {got}"
        )


def check_rates(
    rates: Mapping[str, torch.Tensor],
    params: Params,
    names: frozenset[str],
    steps: int,
    per_step: bool | None,
) -> None:
    """Meta-learned inner rates must cover every adapted parameter and broadcast against it.
    Per-step rates (``per_step=True``; ``None``: those with one axis more than their
    parameter) need a leading step axis of at least ``steps`` entries. Shapes only: no host
    synchronisation (non-finite rates surface as a non-finite loss)."""
    missing = sorted(names - rates.keys())
    if missing:
        raise KeyError(
            f"meta_params['inner_lr']: no learning rate for adapted parameters {missing}"
        )
    for name in names:
        rate, param_shape = rates[name], params[name].shape
        where = f"meta_params['inner_lr'][{name!r}]"
        if not isinstance(rate, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(rate).__name__}")
        stepped = per_step if per_step is not None else rate.dim() > len(param_shape)
        shape = rate.shape
        if stepped:
            if rate.dim() == 0 or rate.shape[0] < steps:
                raise ValueError(
                    f"{where}: per-step rates need a leading step axis of at least {steps} "
                    f"entries, got shape {tuple(rate.shape)}"
                )
            shape = rate.shape[1:]
        if torch.broadcast_shapes(shape, param_shape) != param_shape:
            raise ValueError(
                f"{where}: shape {tuple(shape)} does not broadcast to the parameter's "
                f"{tuple(param_shape)}"
            )


def _signature(params: Params, buffers: Params, tasks: TaskBatch, loss: Any) -> tuple:
    def shapes(tensors: Mapping[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))

    def layout(field: Any) -> tuple:
        if isinstance(field, torch.Tensor):  # the common case, without optree's cost
            return tuple(field.shape[2:]), field.dtype, field.device
        structure = optree.tree_structure(field, none_is_leaf=True)
        return structure, tuple(layout(t) for t in tree.leaves(field))

    task = tuple(layout(field) for field in tasks.tensors())
    # A loss is known by its code, so a lambda written inside the training loop (a new
    # object every step, the same code) is probed once, not every step.
    return shapes(params), shapes(buffers), task, getattr(loss, "__code__", None) or id(loss)


def check_meta_batch(
    model: Any,
    meta_params: Any,
    keys: frozenset[str],
    buffers: Params,
    tasks: Any,
    forward: Forward = plain_forward,
    *,
    loss: LossFn | None = None,
) -> Params:
    """Everything an algorithm's ``grad`` checks about its inputs: ``tasks`` (a non-empty
    :class:`TaskBatch`), ``meta_params`` (a dict with ``keys``) and the model and the
    ``loss`` against both (:func:`check_model_fits_tasks`). Returns ``meta_params["params"]``."""
    check_tasks(tasks)
    check_meta_params(meta_params, keys)
    params = meta_params["params"]
    check_model_fits_tasks(model, params, buffers, tasks, forward, loss=loss)
    return params


def check_model_fits_tasks(
    model: Any,
    params: Params,
    buffers: Params,
    tasks: TaskBatch,
    forward: Forward = plain_forward,
    *,
    loss: LossFn | None = None,
) -> None:
    """Check ``params``/``buffers`` against ``model``, and ``loss`` against its output.

    Once per model, loss and shape signature, a probe runs the model on the first task's
    support and query inputs as the algorithm will (``forward`` at stage 0, no gradient,
    the global random state untouched) and asks ``loss(output, targets)`` whether it can
    score them: the loss, not a guess from shapes, decides what fits (a Gaussian-NLL head
    ``[N, 2]`` against targets ``[N, 1]``, a model returning a tuple). An error or a
    ``UserWarning`` of the loss (``mse_loss`` broadcasting ``[N, 1]`` against ``[N]``), or a
    result that is not a 0-d floating tensor, is a ``ValueError`` naming the task field and
    the shapes. ``loss=None`` checks only that the model runs.

    Integer labels against an output ``[N, C]`` (``C > 1``, class scores) must be below
    ``C``: checked on every call, the labels change (one host synchronisation).
    """
    if isinstance(model, FunctionalModel):
        model.check(params, buffers)
    probed = _PROBED.setdefault(model, {}) if _weakrefable(model) else {}
    signature = _signature(params, buffers, tasks, loss)
    if signature not in probed:
        task = tasks[0]
        with torch.no_grad(), _random_state_kept(tasks.device):
            for x_name, x, y_name, y in (
                ("support_x", task.support_x, "support_y", task.support_y),
                ("query_x", task.query_x, "query_y", task.query_y),
            ):
                out = _probe_forward(model, params, buffers, x, x_name, forward, tasks)
                if loss is not None:
                    check_loss(loss, out, y, y_name, x_name)
        scores_classes = (
            tasks.is_classification
            and isinstance(out, torch.Tensor)
            and out.dim() == 2
            and out.shape[1] > 1
        )
        probed[signature] = out.shape[1] if scores_classes else None
    outputs = probed[signature]
    if outputs is not None:  # one host synchronisation for both label tensors
        tops = torch.stack([tasks.support_y.max(), tasks.query_y.max()]).tolist()
        for name, top in zip(("support_y", "query_y"), tops, strict=True):
            if top >= outputs:
                raise ValueError(
                    f"tasks.{name}: label {top} is out of range for a model with {outputs} "
                    f"outputs (expected labels in 0..{outputs - 1})"
                )


def _blame_parameters(model: Any, params: Params, error: Exception) -> None:
    """When the probe failed and ``params`` do not have the shapes of ``model``'s own
    parameters, raise a ``ValueError`` naming them (rather than blaming the tasks). A leading
    stage axis (MAML++'s per-step parameters) is not a difference."""
    if not isinstance(model, FunctionalModel):
        return
    own = dict(model.module.named_parameters())
    wrong = [
        f"{name!r} has shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}"
        for name, value in sorted(params.items())
        if name in own and value.shape not in (own[name].shape, (value.shape[:1] + own[name].shape))
    ]
    if wrong:
        raise ValueError(
            f"meta_params['params'] do not fit the model: {'; '.join(wrong)} (parameters of "
            "another model?)"
        ) from error


def _feature_hint(tasks: TaskBatch) -> str:
    """A hint for inputs ``[T, S]`` without a feature axis (a model taking ``[N, 1]``)."""
    x = tasks.support_x
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        return ""
    return (
        f"; support_x {list(tasks.support_x.shape)} has no feature axis: for a model that "
        "takes [N, 1], pass support_x.unsqueeze(-1) and query_x.unsqueeze(-1)"
    )


def check_support_set(model: Any, support_x: Any, support_y: Any) -> None:
    """``support_x [S, ...]``, ``support_y [S, ...]``: one task's support set, as an
    algorithm's ``adapt`` takes it (shapes only, safe under ``vmap``). A batch of tasks
    ``[T, S, ...]`` is refused where it can be told apart: class labels of one task are
    ``[S]``, and examples must have the shape of those the model was checked with."""
    inputs = tree.leaves(support_x)  # one tensor, or a tuple/dict of them (model(*x))
    for name, values in (("support_x", inputs), ("support_y", [support_y])):
        for value in values:
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name}: expected a torch.Tensor (or, for support_x, a tuple or dict of "
                    f"them), got {type(value).__name__}"
                )
    if (
        not inputs
        or support_y.dim() == 0
        or any(x.dim() == 0 or x.shape[0] != support_y.shape[0] for x in inputs)
    ):
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(
            "support_x, support_y: expected one task's support set [S, ...] and [S, ...] with "
            f"the same S, got {shapes[0] if len(shapes) == 1 else shapes} and "
            f"{tuple(support_y.shape)}"
        )
    batched = not support_y.is_floating_point() and support_y.dim() == 2  # labels [T, S]
    if isinstance(support_x, torch.Tensor) and not batched:
        # Examples shaped like a batch of those the model was checked with (one tensor of
        # inputs; several inputs are told apart by their labels only).
        probed = _PROBED.get(model, {}) if _weakrefable(model) else {}
        seen = {signature[2][0][0] for signature in probed}
        batched = tuple(support_x.shape[1:]) not in seen and tuple(support_x.shape[2:]) in seen
    if batched:
        raise ValueError(
            f"support_x: shape {tuple(inputs[0].shape)} (labels {tuple(support_y.shape)}) is a "
            f"batch of {inputs[0].shape[0]} tasks; adapt takes one task's support set [S, ...] "
            "(tasks.support_x[i], tasks.support_y[i]); evaluate scores a batch of tasks"
        )


def _weakrefable(model: Any) -> bool:
    try:
        weakref.ref(model)
    except TypeError:
        return False
    return True


def _describe(value: Any) -> str:
    """Shapes of a tensor or of a tuple/dict of tensors, for messages: ``[5, 2]``,
    ``([5, 1], [5, 1])``, ``{'mean': [5, 1]}``."""
    shapes = optree.tree_map(
        lambda v: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__,
        value,
        none_is_leaf=True,
    )
    return str(shapes)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@contextlib.contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """The probe draws no random number anyone sees: a model with dropout in training mode
    runs with the global generator of ``device`` forked and restored."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


def _probe_forward(
    model: Any,
    params: Params,
    buffers: Params,
    x: Any,
    name: str,
    forward: Forward,
    tasks: TaskBatch,
) -> Any:
    try:
        return forward(model, params, buffers, x, 0)[0]
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as error:
        _blame_parameters(model, params, error)
        per_example = tree.map(lambda t: tuple(t.shape[1:]), x)
        dtypes = sorted({str(t.dtype) for t in tree.leaves(x)})
        raise ValueError(
            f"tasks.{name}: the model cannot run on examples of shape {per_example} "
            f"(dtype {', '.join(dtypes)}) with these parameters ({type(error).__name__}: "
            f"{error}). Several inputs go in as a tuple (model(*x)) or a dict (model(**x))"
            f"{_feature_hint(tasks)}"
        ) from error


def check_loss(loss: LossFn, out: Any, y: torch.Tensor, y_name: str, x_name: str) -> None:
    """Ask ``loss(out, y)`` whether it scores the output for ``tasks.{x_name}[0]`` against
    ``tasks.{y_name}[0]``: an error, a ``UserWarning`` (a broadcast) or a result that is not a
    0-d floating tensor is a ``ValueError`` naming both and their shapes."""
    where = (
        f"loss: {_name(loss)}(output, target) on the model's output {_describe(out)} for "
        f"tasks.{x_name}[0] and the targets tasks.{y_name}[0] {list(y.shape)} ({y.dtype})"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            value = loss(out, y)
    except Exception as error:
        raise ValueError(
            f"{where} fails: {type(error).__name__}: {str(error).rstrip('.')}. The loss decides what fits: "
            "give targets it can score against the model's output, or a loss that takes it"
        ) from error
    if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()):
        raise ValueError(
            f"{where}: expected a 0-d floating tensor (the mean over examples), got "
            f"{_describe(value) if isinstance(value, torch.Tensor) else type(value).__name__}"
        )
