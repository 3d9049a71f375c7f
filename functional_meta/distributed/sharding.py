"""Tasks for each rank: every rank draws the same full meta-batch from one seeded stream
and keeps its contiguous slice (see ``functional_meta.distributed``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from functional_meta.data.fewshot import FewShotSampler
from functional_meta.data.tasks import TaskBatch, _as_generator
from functional_meta.distributed.group import context

__all__ = ["sample_shard", "shard", "shard_stream"]


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(
            f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}"
        )
    return rank, world_size


def _share(num_tasks: int, rank: int, world_size: int) -> slice:
    if num_tasks % world_size:
        raise ValueError(
            f"meta-batch: {num_tasks} tasks do not split evenly over {world_size} processes; "
            f"use a meta-batch size divisible by {world_size} (e.g. "
            f"{max(world_size, num_tasks // world_size * world_size)})"
        )
    per_rank = num_tasks // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def shard(tasks: TaskBatch, *, rank: int | None = None, world_size: int | None = None) -> TaskBatch:
    """This rank's contiguous share ``tasks[rank·T : (rank+1)·T]`` of a full meta-batch
    (``T = len(tasks) / world_size``; defaults from the process group). Raises
    ``ValueError`` when the meta-batch does not divide by the world size."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"shard: tasks must be a TaskBatch, got {type(tasks).__name__}")
    rank, world_size = _rank_world(rank, world_size)
    if world_size == 1:
        return tasks
    return tasks[_share(len(tasks), rank, world_size)]


def sample_shard(
    sample: FewShotSampler | Callable[[int, torch.Generator], TaskBatch],
    num_tasks: int,
    generator: torch.Generator | int,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> TaskBatch:
    """This rank's share of a meta-batch of ``num_tasks`` tasks drawn from the shared
    stream ``generator`` (seeded identically on every rank): equal to
    ``shard(sample(num_tasks, generator))``, and it advances ``generator`` exactly as a
    single process would.

    ``sample``: a :class:`~functional_meta.data.FewShotSampler` (draws every task's indices,
    gathers only this rank's images) or any ``sample(num_tasks, generator) -> TaskBatch``,
    e.g. ``lambda n, g: sinusoid_tasks(n, 10, 10, generator=g)``.
    """
    rank, world_size = _rank_world(rank, world_size)
    part = _share(num_tasks, rank, world_size)
    if isinstance(sample, FewShotSampler):
        examples, classes = sample.draw(num_tasks, _as_generator(generator, "sample_shard"))
        return sample.gather(examples[part], classes[part])
    if not callable(sample):
        raise TypeError(
            f"sample_shard: sample must be a FewShotSampler or a callable, got {type(sample).__name__}"
        )
    tasks = sample(num_tasks, generator)
    if not isinstance(tasks, TaskBatch) or len(tasks) != num_tasks:
        raise ValueError(
            f"sample_shard: sample({num_tasks}, generator) must return a TaskBatch of {num_tasks} "
            f"tasks, got {type(tasks).__name__}"
            + (f" of {len(tasks)}" if isinstance(tasks, TaskBatch) else "")
        )
    return tasks[part] if world_size > 1 else tasks


def shard_stream(
    batches: Iterable[TaskBatch], *, rank: int | None = None, world_size: int | None = None
) -> Iterator[TaskBatch]:
    """:func:`shard` applied to every meta-batch of a stream that each rank produces
    identically (same seed)."""
    rank, world_size = _rank_world(rank, world_size)
    for tasks in batches:
        yield shard(tasks, rank=rank, world_size=world_size)
