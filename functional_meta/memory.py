"""How many tasks fit in one batched chunk: ``Batching(chunk_size="auto")``'s rule.

``vmap`` over a chunk of ``c`` tasks keeps the autograd graph of all ``c`` tasks alive at
once: its activation memory grows linearly with ``c``, while the task loop keeps one task's.
``chunk_size="auto"`` picks the largest ``c`` whose estimate stays within the batching's
budget ``memory_budget_mb``:

    c = max(1, ⌊budget / (VMAP_FACTOR · m)⌋),   then balanced: ⌈T / ⌈T / c⌉⌉

where ``m`` is one task's activation memory, measured once by a probe: the per-task
function runs on a copy of the first task, outside ``vmap`` (the task loop's engine),
under ``torch.autograd.graph.saved_tensors_hooks``, and ``m`` is the total size of the
distinct storages it saves for the backward pass (the parameters and nothing else
excluded). ``VMAP_FACTOR`` turns that into what a chunk's peak grows by per task: the
saved tensors, the temporaries of the backward passes through them (as large again and
more in a second-order meta-gradient) and what batched convolutions add (they run grouped,
with expanded weights and gradients per task). It was measured on this project's conv-net
benchmark: on the Omniglot conv4 (W1, docs/benchmarks.md) the probe finds 11.7 MiB per
task and the peak RSS of the chunked vmap grows by 50–60 MB per task of the chunk, hence
5; the default budget of 256 MiB then gives chunks of 4 tasks there, and a peak 1.8× the
task loop's (the batched path without chunks: 4.8×). The estimate is cached per
per-task function (its code and what it closes over, tensors by shape), parameter shapes
and task shapes: it runs once, not every step. The probe draws no random number anyone
sees (the global generator is forked and restored).

The chunk size changes how the meta-batch is cut, never the result beyond float rounding
(the gradient is accumulated chunk by chunk; tests compare it with the whole batch).
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from functional_meta import tree
from functional_meta.data.tasks import Task, TaskBatch, map_inputs

__all__ = ["VMAP_FACTOR", "auto_chunk_size", "task_bytes"]

VMAP_FACTOR = 5.0
"""A chunk's peak memory per task, as a multiple of the probe's saved-tensor bytes."""

# (fingerprint of the function, params, task shapes) -> bytes per task, most recent last.
_ESTIMATES: OrderedDict[Any, int] = OrderedDict()
_ESTIMATES_KEPT = 32


def auto_chunk_size(
    fn: Callable[[Any, Task], Any], params: Any, tasks: TaskBatch, budget_bytes: float
) -> int:
    """The chunk size ``chunk_size="auto"`` means for ``fn`` over ``tasks`` (see the module
    docstring): at least 1, at most ``len(tasks)``."""
    per_task = VMAP_FACTOR * task_bytes(fn, params, tasks)
    largest = max(1, int(budget_bytes // per_task)) if per_task > 0 else len(tasks)
    chunks = math.ceil(len(tasks) / min(largest, len(tasks)))
    return math.ceil(len(tasks) / chunks)


def task_bytes(fn: Callable[[Any, Task], Any], params: Any, tasks: TaskBatch) -> int:
    """One task's activation memory in bytes: what ``fn(params, task)`` saves for the
    backward pass, measured once per function, parameter and task shapes (cached)."""
    key = (
        _fingerprint(fn),
        _fingerprint(params),
        tuple(_fingerprint(field) for field in _first(tasks)),
    )
    found = _ESTIMATES.get(key)
    if found is None:
        found = _probe(fn, params, tasks)
        _ESTIMATES[key] = found
        if len(_ESTIMATES) > _ESTIMATES_KEPT:
            _ESTIMATES.popitem(last=False)
    _ESTIMATES.move_to_end(key)
    return found


def _first(tasks: TaskBatch) -> Task:
    """A copy of the first task (its own storage, not a view of the whole batch's)."""
    return Task(*(map_inputs(lambda t: t[0].clone(), field) for field in tasks.tensors()))


def _probe(fn: Callable[[Any, Task], Any], params: Any, tasks: TaskBatch) -> int:
    leaves = tree.leaves(params)
    owned = {leaf.untyped_storage().data_ptr() for leaf in leaves}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
            return t
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    tracked = tree.map(lambda p: p.detach().requires_grad_(p.is_floating_point()), params)
    devices = [] if tasks.device.type == "cpu" else [tasks.device]
    with (
        torch.random.fork_rng(devices=devices, device_type=tasks.device.type),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        fn(tracked, _first(tasks))
    return sum(saved.values())


def _fingerprint(value: Any, depth: int = 0) -> Any:
    """A hashable summary of what decides a function's memory: tensors by shape, dtype and
    device; functions by code and what they close over; containers by their entries; other
    hashable values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if depth > 6:
        return type(value)
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_fingerprint(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        return value.__code__, tuple(cells)
    if isinstance(value, dict):
        return tuple((k, _fingerprint(v, depth + 1)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value), tuple(_fingerprint(v, depth + 1) for v in value)
    try:
        hash(value)
    except TypeError:
        return type(value)
    return value
