"""Task containers: one task (:class:`Task`) and a meta-batch of tasks (:class:`TaskBatch`).

A meta-batch is four tensors with a leading task axis ``T``::

    support_x [T, S, *feature]   support_y [T, S]
    query_x   [T, Q, *feature]   query_y   [T, Q]

Labels are integer class indices (classification) or floating targets (regression; a
trailing target axis ``[T, S, D]`` is allowed). One task is the same without ``T``.

:class:`TaskBatch` validates shapes once, at construction (the boundary). :class:`Task` is a
plain named tuple and does no checking, so it can be built from the unbatched tensors
inside ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Task", "TaskBatch"]


class Task(NamedTuple):
    """One task: ``support_x [S, ...]``, ``support_y [S]``, ``query_x [Q, ...]``, ``query_y [Q]``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


_FIELDS = ("support_x", "support_y", "query_x", "query_y")


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


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """A meta-batch of ``T`` tasks as four tensors with a leading task axis.

    Compared and hashed by identity, as tensors are hashed (element-wise equality of four
    tensors has no single truth value).

    Raises ``ValueError``/``TypeError`` naming the offending field when the tensors do not
    describe a well-formed batch: leading ``T`` that disagree, an empty support or query set,
    support/query feature shapes that differ, labels whose leading dims do not match the
    inputs, labels that are neither integer nor floating, or negative class labels.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"TaskBatch.{name}: expected a torch.Tensor, got {type(value).__name__}"
                )
        for name in ("support_x", "query_x"):
            if getattr(self, name).dim() < 2:
                raise ValueError(
                    f"TaskBatch.{name}: expected shape [T, N, *features], got {tuple(getattr(self, name).shape)}"
                )
        sizes = {
            name: getattr(self, name).shape[0] if getattr(self, name).dim() else None
            for name in _FIELDS
        }
        if len(set(sizes.values())) != 1:
            described = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(
                f"TaskBatch: the leading task axis T must agree across tensors, got {described}"
            )
        if self.support_x.shape[1] == 0:
            raise ValueError("TaskBatch.support_x: the support set is empty (S=0); expected S >= 1")
        if self.query_x.shape[1] == 0:
            raise ValueError("TaskBatch.query_x: the query set is empty (Q=0); expected Q >= 1")
        devices = {getattr(self, name).device for name in _FIELDS}
        if len(devices) != 1:
            described = ", ".join(f"{name} on {getattr(self, name).device}" for name in _FIELDS)
            raise ValueError(f"TaskBatch: all tensors must be on one device, got {described}")
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                "TaskBatch: support and query features must have the same shape, got "
                f"support_x {tuple(self.support_x.shape)} and query_x {tuple(self.query_x.shape)}"
            )
        if self.support_x.dtype != self.query_x.dtype:
            raise TypeError(
                f"TaskBatch: support_x is {self.support_x.dtype} but query_x is {self.query_x.dtype}"
            )
        for x_name, y_name in (("support_x", "support_y"), ("query_x", "query_y")):
            x, y = getattr(self, x_name), getattr(self, y_name)
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
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        """True when the labels are integer class indices."""
        return not self.support_y.dtype.is_floating_point

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int | slice) -> Task | TaskBatch:
        """``batch[i]`` is one :class:`Task`; ``batch[i:j]`` a smaller :class:`TaskBatch`."""
        if isinstance(index, slice):
            return TaskBatch(*(t[index] for t in self.tensors()))
        return Task(*(t[index] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four tensors in order ``(support_x, support_y, query_x, query_y)``."""
        return (self.support_x, self.support_y, self.query_x, self.query_y)

    def to(self, *args, **kwargs) -> TaskBatch:
        """Move or cast like ``Tensor.to``; labels keep their dtype when casting a dtype."""
        dtype_only = {k: v for k, v in kwargs.items() if k != "dtype"}
        moved_x = [t.to(*args, **kwargs) for t in (self.support_x, self.query_x)]
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
            rows.append(tuple(torch.as_tensor(t) for t in (sx, sy, qx, qy)))
        if not rows:
            raise ValueError("TaskBatch.from_tasks: expected at least one task, got none")
        try:
            return cls(*(torch.stack(column) for column in zip(*rows, strict=True)))
        except RuntimeError as error:
            raise ValueError(
                f"TaskBatch.from_tasks: tasks have different shapes ({error})"
            ) from error
