"""Input checks run once at the public boundary (never inside ``vmap``).

Each raises ``TypeError``/``ValueError``/``KeyError`` with a message that names the
argument, what it got and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from functional_meta import tree
from functional_meta.data.tasks import TaskBatch
from functional_meta.inner import LearningRate, Params, at_stage
from functional_meta.model import FunctionalModel

__all__ = [
    "NonFiniteError",
    "check_finite",
    "check_inner_config",
    "check_inner_steps",
    "check_model_fits_tasks",
    "check_positive_number",
    "check_tasks",
]


class NonFiniteError(FloatingPointError):
    """A meta-loss or meta-gradient was NaN or infinite; nothing was updated."""


def check_tasks(tasks: Any) -> TaskBatch:
    """``tasks`` must be a :class:`TaskBatch` (validated when it was built)."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(
            f"tasks: expected a TaskBatch (support_x [T,S,...], support_y [T,S], query_x [T,Q,...], "
            f"query_y [T,Q]), got {type(tasks).__name__}"
        )
    return tasks


def check_positive_number(name: str, value: Any) -> None:
    """``value`` must be a positive finite ``int`` or ``float`` (``name`` is used in the error)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a positive finite number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")


def check_inner_steps(inner_steps: Any) -> int:
    """``inner_steps`` must be an integer >= 1."""
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps: expected an integer >= 1, got {inner_steps!r}")
    return inner_steps


def check_inner_config(
    params: Params,
    *,
    inner_lr: LearningRate,
    inner_steps: int,
    per_step_lr: bool = False,
    adapted: Collection[str] | Callable[[str], bool] | None = None,
    inner_clip: float | None = None,
    per_step: Collection[str] = (),
) -> frozenset[str]:
    """Validate the inner-loop settings; return the names of the adapted parameters.

    A numeric ``inner_lr`` must be positive and finite. Tensor rates (meta-learned, as in
    Meta-SGD and MAML++, which may legitimately change sign) must be finite, cover every
    adapted parameter and broadcast against it; with ``per_step_lr`` their leading axis must
    have at least ``inner_steps`` entries.
    """
    check_inner_steps(inner_steps)
    if inner_clip is not None:
        check_positive_number("inner_clip", inner_clip)
    names = tree.select_names(params, adapted)
    clash = sorted(names & frozenset(per_step))
    if clash:
        raise ValueError(
            f"adapted: per-step parameters {clash} cannot also be adapted in the inner loop"
        )
    if isinstance(inner_lr, Mapping):
        missing = sorted(names - inner_lr.keys())
        if missing:
            raise KeyError(f"inner_lr: no learning rate for adapted parameters {missing}")
        rates = {name: inner_lr[name] for name in names}
    elif isinstance(inner_lr, torch.Tensor):
        rates = {name: inner_lr for name in names}
    else:
        if per_step_lr:
            raise TypeError(
                "inner_lr: per_step_lr=True needs a tensor (or dict of tensors) with a step axis"
            )
        check_positive_number("inner_lr", inner_lr)
        return names
    for name, rate in rates.items():
        if not isinstance(rate, torch.Tensor):
            raise TypeError(f"inner_lr[{name!r}]: expected a tensor, got {type(rate).__name__}")
        if not bool(torch.isfinite(rate.detach()).all()):
            raise ValueError(f"inner_lr[{name!r}]: learning rates must be finite")
        shape = rate.shape
        if per_step_lr:
            if rate.dim() == 0 or rate.shape[0] < inner_steps:
                raise ValueError(
                    f"inner_lr[{name!r}]: per_step_lr needs a leading step axis of at least "
                    f"inner_steps={inner_steps}, got shape {tuple(rate.shape)}"
                )
            shape = rate.shape[1:]
        param_shape = params[name].shape
        if torch.broadcast_shapes(shape, param_shape) != param_shape:
            raise ValueError(
                f"inner_lr[{name!r}]: shape {tuple(shape)} does not broadcast to the parameter's "
                f"{tuple(param_shape)}"
            )
    return names


def check_model_fits_tasks(
    apply: Callable[[Params, Params, torch.Tensor], torch.Tensor],
    params: Params,
    buffers: Params,
    tasks: TaskBatch,
    per_step: Collection[str] = (),
) -> None:
    """Check ``params``/``buffers`` against the model and the labels against its output.

    Runs the model once on one support example (no gradient). Classification needs
    ``torch.long`` labels below the number of outputs; regression needs targets shaped like
    the model's output per example (``[T, S, D]`` for an output ``[N, D]``).
    """
    if isinstance(apply, FunctionalModel):
        apply.check(params, buffers)
    example = tasks.support_x[0, :1]
    try:
        with torch.no_grad():
            out = apply(at_stage(params, per_step, 0), at_stage(buffers, per_step, 0), example)
    except RuntimeError as error:
        raise ValueError(
            f"tasks.support_x: the model cannot run on examples of shape {tuple(example.shape[1:])} "
            f"(dtype {example.dtype}): {error}"
        ) from error
    if tasks.is_classification:
        for name in ("support_y", "query_y"):
            labels = getattr(tasks, name)
            if labels.dtype != torch.long:
                raise TypeError(
                    f"tasks.{name}: class labels must be torch.long, got {labels.dtype}"
                )
            if out.dim() != 2:
                raise ValueError(
                    f"tasks.{name}: integer labels need a model output [N, classes], got {tuple(out.shape)}"
                )
            if int(labels.max()) >= out.shape[1]:
                raise ValueError(
                    f"tasks.{name}: label {int(labels.max())} is out of range for a model with "
                    f"{out.shape[1]} outputs (expected labels in 0..{out.shape[1] - 1})"
                )
    else:
        for name in ("support_y", "query_y"):
            target_shape = tuple(getattr(tasks, name).shape[2:])
            if tuple(out.shape[1:]) != target_shape:
                raise ValueError(
                    f"tasks.{name}: regression targets per example have shape {target_shape} but the "
                    f"model outputs {tuple(out.shape[1:])}; expected targets "
                    f"[T, N, {', '.join(map(str, out.shape[1:]))}]"
                )


def check_finite(losses: torch.Tensor, grads: Any) -> None:
    """Raise :class:`NonFiniteError` if any task loss or gradient entry is NaN or infinite."""
    finite = torch.stack(
        [torch.isfinite(losses).all(), *(torch.isfinite(g).all() for g in tree.leaves(grads))]
    )
    if not bool(finite.all()):
        where = "meta-loss" if not bool(torch.isfinite(losses).all()) else "meta-gradient"
        raise NonFiniteError(
            f"non-finite {where} (task losses {losses.tolist()}); the parameters were not updated. "
            "Lower the learning rates, clip gradients, or check the data."
        )
