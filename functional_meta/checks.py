"""Checks of tasks and models at the public boundary (never inside ``vmap``).

Settings are validated once, where they are built (:class:`~functional_meta.InnerLoop`,
:class:`~functional_meta.batching.Batching`, the algorithm constructors). What changes
from call to call is checked here: the task batch, the meta-parameters against the model,
and the labels against the model's output. The probe forward that finds whether a model
can take a task batch at all runs once per model and shape signature, not on every step.
Each check raises ``TypeError``/``ValueError``/``KeyError`` naming the argument, what it got
and what was expected.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import Forward, Params, plain_forward
from functional_meta.model import FunctionalModel

__all__ = [
    "check_algorithm_parts",
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


def _signature(params: Params, buffers: Params, tasks: TaskBatch) -> tuple:
    def shapes(tensors: Mapping[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))

    task = tuple((tuple(t.shape[2:]), t.dtype, t.device) for t in tasks.tensors())
    return shapes(params), shapes(buffers), task


def check_meta_batch(
    model: Any,
    meta_params: Any,
    keys: frozenset[str],
    buffers: Params,
    tasks: Any,
    forward: Forward = plain_forward,
) -> Params:
    """Everything an algorithm's ``grad`` checks about its inputs: ``tasks`` (a non-empty
    :class:`TaskBatch`), ``meta_params`` (a dict with ``keys``) and the model against both
    (:func:`check_model_fits_tasks`). Returns ``meta_params["params"]``."""
    check_tasks(tasks)
    check_meta_params(meta_params, keys)
    params = meta_params["params"]
    check_model_fits_tasks(model, params, buffers, tasks, forward)
    return params


def check_model_fits_tasks(
    model: Any,
    params: Params,
    buffers: Params,
    tasks: TaskBatch,
    forward: Forward = plain_forward,
) -> None:
    """Check ``params``/``buffers`` against ``model`` and the labels against its output.

    A probe forward runs the model on one example as the algorithm will (``forward`` at
    stage 0, no gradient), once per model and shape signature. Classification needs ``torch.long`` labels
    below the number of outputs (checked on every call: the labels change); regression
    needs targets shaped like the model's output per example (``[T, S, D]`` for ``[N, D]``).
    """
    if isinstance(model, FunctionalModel):
        model.check(params, buffers)
    probed = _PROBED.setdefault(model, {}) if _weakrefable(model) else {}
    signature = _signature(params, buffers, tasks)
    if signature not in probed:
        example = tasks.support_x[0, :2]  # two examples: batch norm needs more than one
        try:
            with torch.no_grad():
                out = forward(model, params, buffers, example, 0)[0]
        except (RuntimeError, ValueError) as error:
            _blame_parameters(model, params, error)
            raise ValueError(
                f"tasks.support_x: the model cannot run on examples of shape "
                f"{tuple(example.shape[1:])} (dtype {example.dtype}) with these parameters: "
                f"{error}{_feature_hint(tasks)}"
            ) from error
        _check_output(out, tasks)
        probed[signature] = out.shape[1] if tasks.is_classification else None
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
    if tasks.support_x.dim() != 2 or not tasks.support_x.is_floating_point():
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
    for name, value in (("support_x", support_x), ("support_y", support_y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if support_x.dim() == 0 or support_y.dim() == 0 or support_x.shape[0] != support_y.shape[0]:
        raise ValueError(
            "support_x, support_y: expected one task's support set [S, ...] and [S, ...] with "
            f"the same S, got {tuple(support_x.shape)} and {tuple(support_y.shape)}"
        )
    probed = _PROBED.get(model, {}) if _weakrefable(model) else {}
    seen = {signature[2][0][0] for signature in probed}
    batched = (not support_y.is_floating_point() and support_y.dim() == 2) or (
        bool(seen) and tuple(support_x.shape[1:]) not in seen and tuple(support_x.shape[2:]) in seen
    )
    if batched:
        raise ValueError(
            f"support_x: shape {tuple(support_x.shape)} (labels {tuple(support_y.shape)}) is a "
            f"batch of {support_x.shape[0]} tasks; adapt takes one task's support set [S, ...] "
            "(tasks.support_x[i], tasks.support_y[i]); evaluate scores a batch of tasks"
        )


def _weakrefable(model: Any) -> bool:
    try:
        weakref.ref(model)
    except TypeError:
        return False
    return True


def _check_output(out: torch.Tensor, tasks: TaskBatch) -> None:
    if tasks.is_classification:
        for name in ("support_y", "query_y"):
            labels = getattr(tasks, name)
            if labels.dtype != torch.long:
                raise TypeError(
                    f"tasks.{name}: class labels must be torch.long, got {labels.dtype}"
                )
        if out.dim() != 2:
            raise ValueError(
                f"tasks: integer labels need a model output [N, classes], got {tuple(out.shape)}"
            )
        return
    for name in ("support_y", "query_y"):
        target_shape = tuple(getattr(tasks, name).shape[2:])
        if tuple(out.shape[1:]) != target_shape:
            raise ValueError(
                f"tasks.{name}: regression targets per example have shape {target_shape} but the "
                f"model outputs {tuple(out.shape[1:])}; expected targets "
                f"[T, N, {', '.join(map(str, out.shape[1:]))}]{_feature_hint(tasks)}"
            )
