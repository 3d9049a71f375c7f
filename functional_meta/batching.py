"""The one task-batching mechanism: lift a per-task function to a :class:`TaskBatch`.

A meta-batch is cut into chunks; each chunk is mapped either with ``torch.func.vmap``
(strategy ``"vmap"``: the whole batch in one chunk, or ``chunk_size`` tasks at a time) or
task by task in Python (strategy ``"loop"``: chunks of one task, the reference). All
strategies give the same numbers to float rounding.

Strategy ``"compile"`` (opt-in) is ``"vmap"`` with each chunk's meta-gradient compiled by
``torch.compile``: one graph for the forward, the inner gradient and the double backward,
which removes the per-operator dispatch cost that dominates small models (docs/
performance.md); the meta-update is compiled too, in the same graph or its own
(:mod:`functional_meta.compiling`). The first call compiles (tens of seconds on a CPU);
later calls with the same shapes reuse the graph. If compiling fails (an unsupported
operator, no C++ compiler for the CPU backend), it warns once and runs eager ``"vmap"`` from
then on; an error that eager ``vmap`` raises too is the caller's and propagates as it would
without compile.
Forward-only mapping (:func:`over_tasks`: evaluation, Reptile's adaptation) runs eager
``"vmap"``.

Strategy ``"auto"`` (the default) picks one of the two from the model and the device, by a
fixed rule measured on this project's benchmarks (docs/performance.md): a model with
convolutions on the CPU runs ``"loop"`` (vmap turns each convolution with per-task weights
into a grouped convolution, which is slower than the dense one per task and holds every
task's activations at once); everything else runs ``"vmap"`` (with ``chunk_size`` if given),
which on small models removes the per-task Python and dispatch overhead. A conv net that
runs ``"vmap"`` this way (on a GPU) without a ``chunk_size`` gets ``chunk_size="auto"``. A
plain callable that is not a :class:`~functional_meta.model.FunctionalModel` or
``nn.Module`` counts as convolution-free.

**Memory.** ``chunk_size="auto"`` (with ``"vmap"`` or ``"compile"``) picks the largest
chunk whose estimated activation memory stays within ``memory_budget_mb`` (256 MiB by
default), from a probe of one task run once per function and shapes
(:mod:`functional_meta.memory`). On the Omniglot conv4 at meta-batch 32 that is 4 tasks
per chunk and a peak 1.8× the task loop's, against 4.8× for the whole batch at once
(docs/benchmarks.md). The chunk size never changes the result beyond float rounding.

**Randomness.** ``vmap`` maps with ``randomness="different"``: a random operation inside the
per-task function (dropout in a model in training mode) draws independently for every
task, as the loop does task after task. The two strategies then draw from the same
distribution but not the same numbers; with no randomness they agree to float rounding.

:func:`over_tasks` maps a function and stacks its outputs along a new leading task axis.
:func:`mean_value_and_grad` takes the gradient of the mean task loss chunk by chunk and
accumulates it, so the autograd graph of only one chunk is alive at a time: this is what
bounds peak memory for ``chunk_size`` and for ``"loop"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.func import vmap

from functional_meta import tree
from functional_meta.autodiff import grad_and_value
from functional_meta.compiling import compiled_or_eager
from functional_meta.data.tasks import Task, TaskBatch, map_inputs
from functional_meta.memory import auto_chunk_size
from functional_meta.validation import check_positive_number

__all__ = [
    "STRATEGIES",
    "Batching",
    "Strategy",
    "chunk_value_and_grad",
    "mean_value_and_grad",
    "over_tasks",
    "resolve_chunks",
    "resolve_strategy",
    "task_chunks",
]

Strategy = Literal["auto", "vmap", "loop", "compile"]
STRATEGIES: tuple[str, ...] = ("auto", "vmap", "loop", "compile")
TaskFn = Callable[[Any, Task], Any]


@dataclass(frozen=True)
class Batching:
    """How the tasks of a meta-batch are batched, validated once: ``strategy`` (``"auto"``,
    ``"vmap"``, ``"loop"`` or ``"compile"``; see the module docstring), ``chunk_size``
    (``None``: the whole batch at once; an integer: at most that many tasks per chunk;
    ``"auto"``: the largest chunk whose estimated activation memory stays within
    ``memory_budget_mb`` MiB, :mod:`functional_meta.memory`)."""

    strategy: Strategy = "auto"
    chunk_size: int | Literal["auto"] | None = None
    memory_budget_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        size = self.chunk_size
        if (
            size is not None
            and size != "auto"
            and (isinstance(size, bool) or not isinstance(size, int) or size < 1)
        ):
            raise ValueError(
                f'chunk_size: expected None or an integer >= 1 (or "auto"), got {size!r}'
            )
        object.__setattr__(
            self,
            "memory_budget_mb",
            check_positive_number("Batching.memory_budget_mb", self.memory_budget_mb),
        )


def has_convolutions(model: Any) -> bool:
    """Whether ``model`` (a ``FunctionalModel``, an ``nn.Module`` or anything else) contains a
    convolution layer. Anything that is not a module counts as convolution-free."""
    module = getattr(model, "module", model)
    return isinstance(module, nn.Module) and any(
        isinstance(layer, nn.modules.conv._ConvNd) for layer in module.modules()
    )


def resolve_strategy(batching: Batching, *, model: Any = None, device: Any = None) -> Batching:
    """The concrete batching that ``"auto"`` means for ``model`` on ``device`` (see the
    module docstring); other strategies are returned unchanged."""
    if batching.strategy != "auto":
        return batching
    on_cpu = device is None or torch.device(device).type == "cpu"
    convolutions = has_convolutions(model)
    if on_cpu and convolutions:
        return Batching("loop")
    # Batched convolutions hold every task's activations at once: bound them by default.
    size = "auto" if batching.chunk_size is None and convolutions else batching.chunk_size
    return Batching("vmap", size, batching.memory_budget_mb)


def resolve_chunks(batching: Batching, fn: TaskFn, params: Any, tasks: TaskBatch) -> Batching:
    """``batching`` with ``chunk_size="auto"`` replaced by the size it means for ``fn`` over
    ``tasks`` (:func:`functional_meta.memory.auto_chunk_size`); others unchanged."""
    if batching.chunk_size != "auto":
        return batching
    budget = batching.memory_budget_mb * 2**20
    return replace(batching, chunk_size=auto_chunk_size(fn, params, tasks, budget))


def task_chunks(tasks: TaskBatch, batching: Batching) -> Iterator[TaskBatch]:
    """The consecutive chunks a (resolved) batching processes: one task at a time for
    ``"loop"``, ``chunk_size`` tasks (default: all) otherwise."""
    size = 1 if batching.strategy == "loop" else (batching.chunk_size or len(tasks))
    if size >= len(tasks):  # one chunk: the batch itself, not a validated copy of it
        yield tasks
        return
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def _map_chunk(fn: TaskFn, strategy: Strategy) -> Callable[[Any, tuple], Any]:
    """``fn`` mapped over one chunk given as its four tensors, outputs stacked along a
    leading task axis."""
    if strategy != "loop":
        mapped = vmap(
            lambda p, *tensors: fn(p, Task(*tensors)),
            in_dims=(None, 0, 0, 0, 0),
            randomness="different",
        )

        def vmapped(params: Any, tensors: tuple) -> Any:
            try:
                return mapped(params, *tensors)
            except RuntimeError as error:
                if not str(error).startswith("vmap:"):
                    raise
                raise RuntimeError(
                    f'strategy "{strategy}": the per-task function cannot run under '
                    f"torch.func.vmap ({error}). A model or loss that branches on tensor values "
                    "or calls .item() (F.gaussian_nll_loss checks its variance so) runs with "
                    'Batching("loop"), or rewrite it with tensor operations'
                ) from error

        return vmapped

    def looped(params: Any, tensors: tuple) -> Any:
        num_tasks = tensors[1].shape[0]  # the support labels, always one tensor
        outputs = [
            fn(params, Task(*(map_inputs(lambda t, i=i: t[i], field) for field in tensors)))
            for i in range(num_tasks)
        ]
        return tree.map(lambda *xs: torch.stack(xs), *outputs)

    return looped


def _concat(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else tree.map(lambda *xs: torch.cat(xs), *parts)


def over_tasks(
    fn: TaskFn, batching: Batching = Batching(), *, model: Any = None
) -> Callable[[Any, TaskBatch], Any]:
    """Lift ``fn(params, task) -> out`` to ``(params, tasks) -> out`` stacked over tasks.

    Every tensor in ``out`` gains a leading axis ``T``. ``params`` is shared by all tasks
    (not mapped). Use it for forward-only work (evaluation, Reptile's adaptation); for a
    meta-gradient use :func:`mean_value_and_grad`, which bounds memory per chunk.
    ``model`` (the functional model ``fn`` runs) lets ``strategy="auto"`` choose.
    """

    def batched(params: Any, tasks: TaskBatch) -> Any:
        how = resolve_strategy(batching, model=model, device=tasks.device)
        how = resolve_chunks(how, fn, params, tasks)
        mapped = _map_chunk(fn, how.strategy)
        return _concat([mapped(params, chunk.tensors()) for chunk in task_chunks(tasks, how)])

    return batched


def mean_value_and_grad(
    task_loss: Callable[[Any, Task], tuple[torch.Tensor, Any]],
    params: Any,
    tasks: TaskBatch,
    batching: Batching = Batching(),
    *,
    model: Any = None,
) -> tuple[Any, torch.Tensor, Any]:
    """Gradient of the mean task loss ``(1/T) Σ_i L_i(params)`` and the per-task results.

    ``task_loss(params, task) -> (loss [], aux)``; ``batching`` says how the tasks are
    batched. Returns ``(grads, losses [T], aux)``
    with ``grads`` shaped like ``params`` and ``aux`` stacked over tasks; nothing returned
    carries an autograd graph. The gradient is accumulated chunk by chunk (see the module
    docstring), so only one chunk's graph is alive at a time. ``model`` (the functional
    model ``task_loss`` runs) lets ``strategy="auto"`` choose.
    """
    batching = resolve_strategy(batching, model=model, device=tasks.device)
    batching = resolve_chunks(batching, task_loss, params, tasks)
    total, losses, auxes = None, [], []
    for chunk in task_chunks(tasks, batching):
        args = (task_loss, params, chunk.tensors(), len(tasks), batching.strategy)
        if batching.strategy == "compile":
            key = getattr(task_loss, "__code__", task_loss)  # a fresh closure per call
            what = 'eager "vmap" for this task loss'
            grads, (chunk_losses, aux) = compiled_or_eager(chunk_value_and_grad, key, what, *args)
        else:
            grads, (chunk_losses, aux) = chunk_value_and_grad(*args)
        total = grads if total is None else tree.add(total, grads)
        losses.append(chunk_losses)
        auxes.append(aux)
    return total, torch.cat(losses), _concat(auxes)


def chunk_value_and_grad(
    task_loss: Callable[[Any, Task], tuple[torch.Tensor, Any]],
    params: Any,
    tensors: tuple,
    num_tasks: int,
    strategy: Strategy,
) -> tuple[Any, tuple[torch.Tensor, Any]]:
    """One chunk's share of :func:`mean_value_and_grad`: the gradient of
    ``(1/num_tasks) Σ_i L_i(params)`` over the chunk's tasks (its four tensors, mapped as
    ``strategy`` says), and ``(losses [chunk], aux)`` without graphs. The unit that strategy
    ``"compile"`` compiles."""
    mapped = _map_chunk(task_loss, strategy)

    def objective(p: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        losses, aux = mapped(p, tensors)
        return losses.sum() / num_tasks, (losses.detach(), aux)

    # torch.autograd outside transforms, torch.func inside (and when compiled): see
    # functional_meta.autodiff. Over vmap too, autograd saves one transform level.
    grads, (_, out) = grad_and_value(objective, params)
    return grads, out
