"""Few-shot evaluation: adapt on each test task's support set, score its query set.

:func:`evaluate` works for any :class:`~functional_meta.Algorithm`: for every test task it
calls the record's ``adapt`` on the support set and ``predict`` on the query inputs, and
scores the prediction with the record's loss (:func:`task_scores`), batched over tasks with
:func:`functional_meta.over_tasks` under ``torch.no_grad``: the inner loop still takes its
gradients, but no outer graph is built and nothing returned carries one. It reports the mean over tasks and
the 95% confidence interval the way few-shot papers do, ``mean ± 1.96 · std / √n``.

Use the same fixed tasks for every algorithm: :func:`functional_meta.data.fixed_tasks` for
N-way K-shot data, :func:`sinusoid_test_tasks` for the sinusoid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optree
import torch

from functional_meta import tree
from functional_meta.batching import over_tasks
from functional_meta.checks import check_loss, check_tasks
from functional_meta.data.sinusoid import sample_sinusoids
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.losses import scores
from functional_meta.steps import Algorithm, TrainState
from functional_meta.validation import NonFiniteError, check_count

__all__ = [
    "EvaluationResult",
    "as_state",
    "check_scorable",
    "confidence_interval",
    "evaluate",
    "sinusoid_test_tasks",
    "state_to",
    "task_scores",
    "task_shape",
]

Z_95 = 1.96


def confidence_interval(
    values: torch.Tensor | Iterable[float], z: float = Z_95
) -> tuple[float, float]:
    """``(mean, half_width)`` of ``values [n]`` with ``half_width = z · std / √n``.

    ``std`` is the population standard deviation (``numpy.std``'s default, as in Finn et
    al.'s evaluation code); ``z = 1.96`` gives the usual 95% interval. One value gives a
    zero half-width. Raises ``ValueError`` for no values or a non-finite one.
    """
    values = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values))
    values = values.detach().to(torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("confidence_interval: values is empty; expected at least one value")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("confidence_interval: values contain NaN or infinity")
    n = values.numel()
    mean = values.mean().item()
    std = values.std(correction=0).item()
    return mean, z * std / math.sqrt(n)


@dataclass(frozen=True)
class EvaluationResult:
    """Scores over ``num_tasks`` test tasks: means and 95% half-widths (``± ci``).

    ``losses [n]`` and ``accuracies [n]`` are the per-task values (accuracy ``None`` for
    regression); ``steps`` the inner steps used.
    """

    loss: float
    loss_ci: float
    accuracy: float | None
    accuracy_ci: float | None
    num_tasks: int
    steps: int
    losses: torch.Tensor
    accuracies: torch.Tensor | None

    def as_dict(self) -> dict[str, float | int | None]:
        """The summary as plain numbers (for JSON)."""
        return {
            "loss": self.loss,
            "loss_ci": self.loss_ci,
            "accuracy": self.accuracy,
            "accuracy_ci": self.accuracy_ci,
            "num_tasks": self.num_tasks,
            "steps": self.steps,
        }

    def __str__(self) -> str:
        text = f"loss {self.loss:.4f} ± {self.loss_ci:.4f}"
        if self.accuracy is not None:
            text += f", accuracy {100 * self.accuracy:.2f}% ± {100 * (self.accuracy_ci or 0):.2f}%"
        return text + f" ({self.num_tasks} tasks, {self.steps} steps, 95% interval)"


def sinusoid_test_tasks(
    num_tasks: int = 600,
    *,
    seed: int = 2,
    support: int = 10,
    query: int = 10,
    batch_size: int = 100,
) -> list[TaskBatch]:
    """A fixed sinusoid evaluation set: ``num_tasks`` tasks drawn at once from ``seed``, cut
    into meta-batches of ``batch_size`` (``support_x [B, support, 1]`` ...). Task ``i`` does
    not depend on ``batch_size``, so every algorithm is scored on the same tasks."""
    for name, value in (("num_tasks", num_tasks), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sinusoid_test_tasks: {name} must be an integer >= 1, got {value!r}")
    tasks = sample_sinusoids(num_tasks, support, query, generator=seed).tasks
    return [tasks[i : i + batch_size] for i in range(0, num_tasks, batch_size)]


def state_to(state: TrainState, device: torch.device | str | None) -> TrainState:
    """``state`` with every tensor moved to ``device`` (``None``: unchanged); ``ValueError``
    for a device that is not one, or CUDA on a machine without it."""
    if device is None:
        return state
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device ({error})") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r}, but CUDA is not available on this machine")
    return TrainState(*(tree.map(lambda t: t.to(device), part) for part in state))


def check_scorable(algorithm: Algorithm, meta_params: Any, buffers: Any, tasks: TaskBatch) -> None:
    """The record's loss must score its prediction for the first task's query inputs
    against the targets (``predict`` after ``adapt`` with no inner step): the loss decides
    what fits, and a broadcast it warns about is an error rather than a wrong score."""
    task = tasks[0]
    try:
        adapted = algorithm.adapt(meta_params, buffers, task.support_x, task.support_y, steps=0)
        out = algorithm.predict(adapted, task.query_x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # the model's own error, e.g. a shape mismatch
        raise _cannot_run(tasks, error) from error
    check_loss(algorithm.loss, out, task.query_y, "query_y", "query_x")


def task_shape(tasks: TaskBatch) -> tuple:
    """What :func:`check_scorable` depends on: the structure of one task's inputs and
    targets and the shape, dtype and device of each of their tensors. Batches of equal
    shape need one check, not one each."""
    first = tasks[0]
    leaves, structure = optree.tree_flatten(
        (first.support_x, first.support_y, first.query_x, first.query_y)
    )
    return structure, tuple((tuple(x.shape), x.dtype, x.device) for x in leaves)


def _cannot_run(tasks: TaskBatch, error: Exception) -> ValueError:
    """The model's own error on ``tasks``, said in terms of the tasks' shapes."""

    def shapes(x: Any) -> Any:
        return (
            tuple(x.shape) if isinstance(x, torch.Tensor) else tree.map(lambda t: tuple(t.shape), x)
        )

    return ValueError(
        f"tasks: the model cannot run on tasks of support_x {shapes(tasks.support_x)}, "
        f"query_x {shapes(tasks.query_x)} with these parameters: {error}"
    )


def as_state(
    state: TrainState | Mapping[str, Any], buffers: Mapping[str, Any] | None
) -> TrainState:
    """``state`` as a :class:`TrainState` (no optimizer state): a TrainState unchanged, a
    record's meta-parameter dict (with ``"params"``) or a plain parameter dict (wrapped as
    ``{"params": state}``) with ``buffers``."""
    if isinstance(state, TrainState):
        if buffers is not None:
            raise ValueError("buffers: a TrainState holds its own buffers; pass one or the other")
        return state
    if not isinstance(state, Mapping) or not state:
        raise TypeError(
            "state: expected a TrainState or a non-empty dict of meta-parameters, got "
            f"{type(state).__name__}"
        )
    if buffers is not None and not isinstance(buffers, Mapping):
        raise TypeError(f"buffers: expected a dict of tensors, got {type(buffers).__name__}")
    meta_params = dict(state) if isinstance(state.get("params"), Mapping) else {"params": state}
    return TrainState(meta_params, None, dict(buffers or {}))


def task_scores(
    algorithm: Algorithm, buffers: dict[str, torch.Tensor], steps: int | None
) -> Callable[[Any, Task], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The per-task evaluation ``fn(meta_params, task) -> (query_loss [], aux)``: adapt on the
    support set for ``steps`` inner steps (``None``: as trained, ``0``: none), predict the
    query inputs, score them (``aux``: ``query_loss`` and, for classification,
    ``accuracy``). Run it under ``torch.no_grad`` (:func:`evaluate` does)."""

    def fn(meta_params: Any, task: Task) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adapted = algorithm.adapt(meta_params, buffers, task.support_x, task.support_y, steps)
        result = scores(algorithm.predict(adapted, task.query_x), task.query_y, algorithm.loss)
        return result["loss"], {"query_loss": result.pop("loss"), **result}

    return fn


def _as_batches(tasks: Any) -> Iterable[TaskBatch]:
    if isinstance(tasks, TaskBatch):
        return [tasks]
    if isinstance(tasks, Iterable) and not isinstance(tasks, str | bytes):
        return tasks
    raise TypeError(
        f"tasks: expected a TaskBatch or an iterable of TaskBatch (e.g. fixed_tasks(...)), "
        f"got {type(tasks).__name__}"
    )


def evaluate(
    algorithm: Algorithm,
    state: TrainState | Mapping[str, Any],
    tasks: TaskBatch | Iterable[TaskBatch],
    *,
    steps: int | None = None,
    num_tasks: int | None = None,
    device: torch.device | str | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> EvaluationResult:
    """Adapt on every test task's support set for ``steps`` inner steps and score its query.

    Args:
        algorithm: the :class:`~functional_meta.Algorithm` record (its ``batching``
            batches the tasks, its ``loss`` scores them).
        state: the trained :class:`TrainState`, or, from a loop of your own, the
            meta-parameters your step function updates: a plain parameter dict (what
            ``maml_step`` takes) or the record's meta-parameter dict (``{"params": ...,
            ...}``, e.g. with Meta-SGD's rates), with the model's ``buffers``.
        tasks: a :class:`TaskBatch` (``support_x [T, S, ...]``, ``query_x [T, Q, ...]``) or
            an iterable of them (``fixed_tasks(...)``, :func:`sinusoid_test_tasks`).
        steps: inner steps (``None``: as in training; ``0``: score the meta-parameters
            without adapting). May differ from training's.
        num_tasks: stop after this many tasks (``None``: all of them).
        device: move the state and each batch there first.
        buffers: the model's buffers when ``state`` is a parameter dict (default none);
            not allowed with a :class:`TrainState`, which holds its own.

    Returns an :class:`EvaluationResult` with mean loss, mean accuracy (classification)
    and their 95% half-widths over the tasks. No outer autograd graph is built.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm: expected an Algorithm record, got {type(algorithm).__name__}")
    state = as_state(state, buffers)
    check_count("steps", steps, minimum=0, optional=True)
    check_count("num_tasks", num_tasks, optional=True)
    state = state_to(state, device)
    meta_params, buffers = tree.detach(state.meta_params), tree.detach(state.buffers)
    fn = task_scores(algorithm, buffers, steps)
    mapped = over_tasks(fn, algorithm.batching, model=algorithm.model)
    losses, accuracies, seen = [], [], 0
    checked = set()  # the task shapes check_scorable has passed: it is run once per shape
    with torch.no_grad():
        for batch in _as_batches(tasks):
            if not isinstance(batch, TaskBatch):
                raise TypeError(
                    f"tasks: expected every item to be a TaskBatch, got {type(batch).__name__}"
                )
            if num_tasks is not None:
                if seen >= num_tasks:
                    break
                batch = batch[: num_tasks - seen]
            if device is not None:
                batch = batch.to(device)
            check_tasks(batch)
            shape = task_shape(batch)
            if shape not in checked:
                check_scorable(algorithm, meta_params, buffers, batch)
                checked.add(shape)
            try:
                batch_losses, aux = mapped(meta_params, batch)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # the model's own error, e.g. a shape mismatch
                raise _cannot_run(batch, error) from error
            losses.append(batch_losses.detach().float().cpu())
            if "accuracy" in aux:
                accuracies.append(aux["accuracy"].detach().float().cpu())
            seen += len(batch)
    if not losses:
        raise ValueError("tasks: no tasks to evaluate (the iterable was empty)")
    all_losses = torch.cat(losses)
    if not bool(torch.isfinite(all_losses).all()):
        raise NonFiniteError(
            f"evaluate: {int((~torch.isfinite(all_losses)).sum())} of {all_losses.numel()} "
            "task losses are NaN or infinite; lower the inner learning rate or the steps"
        )
    mean, ci = confidence_interval(all_losses)
    acc = acc_ci = all_acc = None
    if accuracies:
        all_acc = torch.cat(accuracies)
        acc, acc_ci = confidence_interval(all_acc)
    used = algorithm.inner_steps if steps is None else steps
    return EvaluationResult(mean, ci, acc, acc_ci, all_losses.numel(), used, all_losses, all_acc)
