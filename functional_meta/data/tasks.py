"""Task containers: one task (:class:`Task`) and a meta-batch of tasks (:class:`TaskBatch`).

A meta-batch is four tensors with a leading task axis ``T``::

    support_x [T, S, *feature]   support_y [T, S]
    query_x   [T, Q, *feature]   query_y   [T, Q]

Labels are integer class indices (classification) or floating targets (regression; a
trailing target axis ``[T, S, D]`` is allowed). One task is the same without ``T``.

A model whose ``forward`` takes several inputs gets them as a tuple (``model(*x)``) or a
dict (``model(**x)``) of tensors in ``support_x``/``query_x``, each with the same leading
``[T, N]`` (e.g. ``(x [T, S, L, D], mask [T, S, L])``); every part of the library maps over
their leaves (:func:`map_inputs`).

:class:`TaskBatch` validates shapes once, at construction (the boundary). :class:`Task` is a
plain named tuple and does no checking, so it can be built from the unbatched tensors
inside ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch

__all__ = ["Inputs", "Task", "TaskBatch", "as_task_batch", "input_leaves", "map_inputs"]

Inputs = Any
"""A model's inputs: a tensor, or a tuple (positional) or dict (keyword) of tensors."""


class Task(NamedTuple):
    """One task: ``support_x [S, ...]``, ``support_y [S]``, ``query_x [Q, ...]``, ``query_y [Q]``
    (inputs may be a tuple or dict of tensors, see the module docstring)."""

    support_x: Inputs
    support_y: torch.Tensor
    query_x: Inputs
    query_y: torch.Tensor


_X = ("support_x", "query_x")


def _as_generator(generator: torch.Generator | int, where: str) -> torch.Generator:
    """A ``torch.Generator`` from a generator or an integer seed; anything else is a TypeError."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{where}: generator must be a torch.Generator or an int seed, got {type(generator).__name__}"
    )


def _check_count(value: object, name: str, where: str, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")
    return value


def input_leaves(x: Inputs, name: str) -> list[tuple[str, torch.Tensor]]:
    """``(label, tensor)`` for every leaf of the inputs ``x`` (a tensor, or a tuple, list or
    dict of tensors, nested or not), labelled like ``support_x[1]`` or
    ``support_x['mask']``. A leaf that is not a tensor is a ``TypeError`` naming it."""
    if isinstance(x, torch.Tensor):
        return [(name, x)]
    paths, leaves, _ = optree.tree_flatten_with_path(x, none_is_leaf=True)
    if not leaves:
        raise ValueError(f"{name}: expected a tensor or a tuple/dict of tensors, got an empty one")
    labelled = []
    for path, leaf in zip(paths, leaves, strict=True):
        label = name + "".join(f"[{key!r}]" for key in path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(leaf).__name__}")
        labelled.append((label, leaf))
    return labelled


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], x: Inputs, *rest: Inputs) -> Inputs:
    """``fn`` applied to every tensor of the inputs ``x`` (and the same leaves of ``rest``),
    keeping their structure: a tensor gives a tensor, a tuple of tensors a tuple."""
    return optree.tree_map(fn, x, *rest, none_is_leaf=True)


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """A meta-batch of ``T`` tasks as four fields with a leading task axis.

    ``support_x``/``query_x`` are each a tensor ``[T, N, *features]`` or, for a model whose
    ``forward`` takes several inputs, a tuple (positional inputs, ``model(*x)``) or a dict
    (keyword inputs, ``model(**x)``) of such tensors, every one with the same ``[T, N]``;
    support and query have the same structure. Labels are tensors.

    Compared and hashed by identity, as tensors are hashed (element-wise equality of four
    tensors has no single truth value).

    Raises ``ValueError``/``TypeError`` naming the offending field when the tensors do not
    describe a well-formed batch: leading ``T`` that disagree, an empty support or query set,
    support/query feature shapes that differ, labels whose leading dims do not match the
    inputs, labels that are neither integer nor floating, or negative class labels.
    """

    support_x: Inputs
    support_y: torch.Tensor
    query_x: Inputs
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        inputs = {name: input_leaves(getattr(self, name), f"TaskBatch.{name}") for name in _X}
        for name in ("support_y", "query_y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"TaskBatch.{name}: expected a torch.Tensor, got {type(value).__name__}"
                )
        for label, x in inputs["support_x"] + inputs["query_x"]:
            if x.dim() < 2:
                raise ValueError(f"{label}: expected shape [T, N, *features], got {tuple(x.shape)}")
        labelled = [*inputs["support_x"], ("support_y", self.support_y)]
        labelled += [*inputs["query_x"], ("query_y", self.query_y)]
        sizes = {label.removeprefix("TaskBatch."): t.shape[0] if t.dim() else None
                 for label, t in labelled}  # fmt: skip
        if len(set(sizes.values())) != 1:
            described = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(
                f"TaskBatch: the leading task axis T must agree across tensors, got {described}"
            )
        for name, empty in (("support_x", "S"), ("query_x", "Q")):
            label, first = inputs[name][0]
            if first.shape[1] == 0:
                which = "support" if name == "support_x" else "query"
                raise ValueError(
                    f"{label}: the {which} set is empty ({empty}=0); expected {empty} >= 1"
                )
            for other, x in inputs[name][1:]:
                if x.shape[:2] != first.shape[:2]:
                    raise ValueError(
                        f"{other}: expected the task and example axes {tuple(first.shape[:2])} "
                        f"of {label}, got shape {tuple(x.shape)}"
                    )
        devices = {t.device for _, t in labelled}
        if len(devices) != 1:
            described = ", ".join(f"{label} on {t.device}" for label, t in labelled)
            raise ValueError(f"TaskBatch: all tensors must be on one device, got {described}")
        if optree.tree_structure(self.support_x, none_is_leaf=True) != optree.tree_structure(
            self.query_x, none_is_leaf=True
        ):
            raise ValueError(
                "TaskBatch: support_x and query_x must have the same structure (both a tensor, "
                "or tuples/dicts with the same entries)"
            )
        for (s_label, s), (q_label, q) in zip(*inputs.values(), strict=True):
            if s.shape[2:] != q.shape[2:]:
                raise ValueError(
                    "TaskBatch: support and query features must have the same shape, got "
                    f"{s_label.removeprefix('TaskBatch.')} {tuple(s.shape)} and "
                    f"{q_label.removeprefix('TaskBatch.')} {tuple(q.shape)}"
                )
            if s.dtype != q.dtype:
                raise TypeError(
                    f"TaskBatch: {s_label.removeprefix('TaskBatch.')} is {s.dtype} but "
                    f"{q_label.removeprefix('TaskBatch.')} is {q.dtype}"
                )
        for x_name, y_name in (("support_x", "support_y"), ("query_x", "query_y")):
            x, y = inputs[x_name][0][1], getattr(self, y_name)
            if y.dim() < 2 or y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"TaskBatch.{y_name}: expected shape [T, N] (or [T, N, D] for regression) matching "
                    f"{x_name} {tuple(x.shape[:2])}, got {tuple(y.shape)}"
                )
            if y.dtype.is_floating_point:
                continue
            if y.dtype == torch.bool or y.dtype.is_complex:
                raise TypeError(
                    f"TaskBatch.{y_name}: expected integer class labels (torch.long) or floating "
                    f"regression targets, got {y.dtype}"
                )
            if y.dim() != 2:
                raise ValueError(
                    f"TaskBatch.{y_name}: class labels must be [T, N], got {tuple(y.shape)}"
                )
            if y.numel() and int(y.min()) < 0:
                raise ValueError(
                    f"TaskBatch.{y_name}: class labels must be >= 0, got min {int(y.min())}"
                )
        if self.support_y.dtype.is_floating_point != self.query_y.dtype.is_floating_point:
            raise TypeError(
                f"TaskBatch: support_y is {self.support_y.dtype} but query_y is {self.query_y.dtype}; "
                "both must be class labels or both regression targets"
            )

        if self.support_y.shape[2:] != self.query_y.shape[2:]:
            raise ValueError(
                "TaskBatch: support and query targets must have the same trailing shape, got "
                f"support_y {tuple(self.support_y.shape)} and query_y {tuple(self.query_y.shape)}"
            )

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks."""
        return self.support_y.shape[0]

    @property
    def device(self) -> torch.device:
        """The device every tensor of the batch is on."""
        return self.support_y.device

    @property
    def is_classification(self) -> bool:
        """True when the labels are integer class indices."""
        return not self.support_y.dtype.is_floating_point

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int | slice) -> Task | TaskBatch:
        """``batch[i]`` is one :class:`Task`; ``batch[i:j]`` a smaller :class:`TaskBatch`."""
        fields = (map_inputs(lambda t: t[index], field) for field in self.tensors())
        return TaskBatch(*fields) if isinstance(index, slice) else Task(*fields)

    def tensors(self) -> tuple[Inputs, torch.Tensor, Inputs, torch.Tensor]:
        """The four fields in order ``(support_x, support_y, query_x, query_y)`` (the inputs
        are tensors, or tuples/dicts of them)."""
        return (self.support_x, self.support_y, self.query_x, self.query_y)

    def to(self, *args, **kwargs) -> TaskBatch:
        """Move or cast like ``Tensor.to``; labels keep their dtype when casting a dtype."""
        dtype_only = {k: v for k, v in kwargs.items() if k != "dtype"}
        moved_x = [
            map_inputs(lambda t: t.to(*args, **kwargs), x) for x in (self.support_x, self.query_x)
        ]
        # Class labels only move: drop dtypes, and take only the device of a tensor argument
        # (``Tensor.to(other)`` would otherwise cast the labels to other's dtype).
        label_args = tuple(
            a.device if isinstance(a, torch.Tensor) else a
            for a in args
            if not isinstance(a, torch.dtype)
        )
        moved_y = [
            t.to(*args, **kwargs) if t.dtype.is_floating_point else t.to(*label_args, **dtype_only)
            for t in (self.support_y, self.query_y)
        ]
        return TaskBatch(moved_x[0], moved_y[0], moved_x[1], moved_y[1])

    @classmethod
    def from_tasks(cls, tasks) -> TaskBatch:
        """Stack a sequence of tasks, each ``((support_x, support_y), (query_x, query_y))``
        (the original class-based API's format) or a :class:`Task`, into a batch."""
        rows = []
        for i, task in enumerate(tasks):
            if isinstance(task, Task):
                rows.append(tuple(task))
                continue
            try:
                (sx, sy), (qx, qy) = task
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"TaskBatch.from_tasks: task {i} must be ((support_x, support_y), (query_x, query_y))"
                ) from error
            rows.append(tuple(map_inputs(torch.as_tensor, t) for t in (sx, sy, qx, qy)))
        if not rows:
            raise ValueError("TaskBatch.from_tasks: expected at least one task, got none")
        try:
            return cls(*(map_inputs(lambda *xs: torch.stack(xs), *column)
                         for column in zip(*rows, strict=True)))  # fmt: skip
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"TaskBatch.from_tasks: tasks have different shapes ({error})"
            ) from error


def as_task_batch(item: Any) -> TaskBatch:
    """One task-source item as a :class:`TaskBatch`: a TaskBatch, a list of tasks
    ``((support_x, support_y), (query_x, query_y))`` (each without a task axis), or one such
    pair of pairs whose tensors carry a leading task axis (a collated ``DataLoader`` batch)."""
    if isinstance(item, TaskBatch):
        return item
    if isinstance(item, list | tuple) and item:
        pairs = len(item) == 2 and all(
            isinstance(part, list | tuple)
            and len(part) == 2
            and all(isinstance(t, torch.Tensor) for t in part)
            for part in item
        )
        if pairs:  # ((support_x [T,S,..], support_y), (query_x, query_y)): already batched
            (sx, sy), (qx, qy) = item
            return TaskBatch(sx, sy, qx, qy)
        return TaskBatch.from_tasks(item)
    raise TypeError(
        "tasks: each item must be a TaskBatch or a list of ((support_x, support_y), "
        f"(query_x, query_y)) tasks, got {type(item).__name__}"
    )
