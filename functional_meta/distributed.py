"""Data-parallel meta-learning over tasks with ``torch.distributed``: no module wrapper, no
home-made communication.

Every rank holds the same :class:`~functional_meta.TrainState`, computes the meta-gradient
of *its share of the tasks* with the usual (vmapped) step, and the meta-gradients, the
metrics and any statistics (MAML++'s batch statistics) are averaged with
``torch.distributed.all_reduce`` before the identical optimizer update on every rank. It
works for any algorithm record and for any gradient function of a user's own loop::

    ctx = distributed.init()                                  # from torchrun's environment
    state = distributed.broadcast(fm.init_state(algorithm, params, buffers, optimizer))
    stream = torch.Generator().manual_seed(seed)              # the SAME seed on every rank
    for step in range(steps):
        tasks = distributed.sample_shard(sample, 32, stream)  # this rank's 32 / world tasks
        state, metrics = distributed.step(algorithm, state, tasks, optimizer)

    # or, in a maml_step-style loop:
    maml_grad = distributed.data_parallel(fm.maml_grad)
    grads, metrics = maml_grad(params, tasks, apply=apply, buffers=buffers, ...)

**One seeded stream.** Every rank draws the *same* full meta-batch from the same generator
state and keeps its contiguous slice ``tasks[rank·T : (rank+1)·T]`` (``T = meta-batch /
world``). The generator then advances identically everywhere, so the run sees exactly the
tasks a single process would, in the same order, whatever the number of processes: a
checkpoint resumes under any world size, and ``k`` distributed steps equal ``k``
single-process steps to float rounding. Drawing the full batch costs a few tensor ops (a
:class:`~functional_meta.data.FewShotSampler` draws all indices but gathers only the slice).

**Why averaging is exact.** Every algorithm's meta-gradient, metrics and statistics are
means over tasks; with equal shards the mean of the per-rank means is the global mean
(the meta-batch must divide by the world size). Reptile's inner mini-batches are shared by
all tasks of a meta-batch, so its generator must be the same stream on every rank too.

Collectives per step: one small ``float64`` ``all_reduce`` in which every rank says whether
its gradient succeeded — so that a failure on one rank (e.g.
:class:`~functional_meta.NonFiniteError` on its tasks) raises on *every* rank in the same
step instead of leaving the others waiting — then one ``all_reduce`` per (dtype, device) of
the gradient's tensors (usually one) and one ``float64`` ``all_reduce`` of its numbers.

Outside a process group (plain ``python``) every function here is the single-process
identity, so the same script runs with and without ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import optree
import torch
import torch.distributed as dist

from functional_meta.data.fewshot import FewShotSampler
from functional_meta.data.tasks import TaskBatch, _as_generator
from functional_meta.optim import GradientTransformation
from functional_meta.steps import Algorithm, Metrics, TrainState, update
from functional_meta.validation import NonFiniteError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Context",
    "DistributedError",
    "DivergenceError",
    "all_reduce_mean",
    "broadcast",
    "check_in_sync",
    "context",
    "data_parallel",
    "free_port",
    "init",
    "run",
    "sample_shard",
    "shard",
    "shard_stream",
    "shutdown",
    "spawn",
    "step",
    "torchrun_env",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = datetime.timedelta(seconds=60)
"""How long a collective (and ``init_process_group``) waits for the other ranks."""

_OK, _NON_FINITE, _FAILED = 0.0, 1.0, 2.0
_CPU = torch.device("cpu")


class DistributedError(RuntimeError):
    """A distributed run cannot go on consistently (another rank failed, bad environment)."""


class DivergenceError(DistributedError):
    """Ranks that should hold identical tensors do not."""


# -- process group -----------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its
    machine), the ``backend`` (``None`` outside a process group) and the ``device`` the
    rank computes on (``cuda:<local_rank>`` with nccl, else the CPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = _CPU

    @property
    def is_main(self) -> bool:
        """True on rank 0: the one process that prints, writes checkpoints and plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True inside an initialised process group."""
        return self.backend is not None


def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from the variables torchrun sets (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), or ``None`` when they are absent (a plain process).
    Raises :class:`DistributedError` for a partial or malformed set."""
    environ = os.environ if environ is None else environ
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}
    present = {key: environ.get(var) for key, var in names.items()}
    if all(v is None for v in (present["rank"], present["world_size"])):
        return None
    try:
        values = {key: int(value if value is not None else 0) for key, value in present.items()}
    except ValueError as error:
        raise DistributedError(
            f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {present}"
        ) from error
    if present["rank"] is None or present["world_size"] is None:
        raise DistributedError(
            f"torchrun environment: RANK and WORLD_SIZE must both be set, got {present}"
        )
    if not 0 <= values["rank"] < values["world_size"]:
        raise DistributedError(
            f"torchrun environment: expected 0 <= RANK < WORLD_SIZE, got {present}"
        )
    return values


def _device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return _CPU


def context(group: Any = None) -> Context:
    """The current :class:`Context`: the initialised process group's, else a single
    process (rank 0 of 1, no backend)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    backend = str(dist.get_backend(group))
    env = torchrun_env() or {}
    local_rank = env.get("local_rank", 0)
    return Context(
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        local_rank=local_rank,
        backend=backend,
        device=_device(backend, local_rank),
    )


def init(
    backend: str | None = None,
    *,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> Context:
    """Join the process group described by torchrun's environment variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; the
    standard ``env://`` initialisation) and return this rank's :class:`Context`.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"`` (default); with nccl
    the rank's device is ``cuda:<LOCAL_RANK>``. ``timeout`` bounds how long the
    initialisation and every collective wait for the other ranks. Without the torchrun
    variables nothing is initialised and a single-process context is returned. Calling it
    again inside an initialised group returns the current context.
    """
    if dist.is_available() and dist.is_initialized():
        return context()
    env = torchrun_env()
    if env is None:
        return Context()
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of torch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(
            f"torchrun environment: {', '.join(missing)} not set; launch with torchrun or set them"
        )
    if backend == "nccl":
        if not torch.cuda.is_available() or env["local_rank"] >= torch.cuda.device_count():
            raise DistributedError(
                f"backend nccl: LOCAL_RANK={env['local_rank']} has no CUDA device "
                f"({torch.cuda.device_count()} visible); use gloo on CPU"
            )
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=env["rank"],
        world_size=env["world_size"],
        timeout=timeout,
    )
    return context()


def shutdown() -> None:
    """Leave the process group (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world(group: Any = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


# -- tasks ---------------------------------------------------------------------------------
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


# -- communication -------------------------------------------------------------------------
def _comm_device(group: Any) -> torch.device:
    if str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


def _buckets(tensors: list[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Leaf indices grouped by (dtype, device), in first-seen order (same on every rank)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _flat(tensors: list[torch.Tensor], extra: torch.Tensor | None, device: torch.device):
    parts = [t.detach().reshape(-1) for t in tensors]
    if extra is not None:
        parts.append(extra.to(parts[0].dtype if parts else extra.dtype))
    return torch.cat(parts).to(device)


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape).to(t.device))
        offset += n
    return out


def _tensor_leaves(tree: Any) -> tuple[list[Any], Any, list[int]]:
    leaves, spec = optree.tree_flatten(tree)
    return leaves, spec, [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]


def _all_reduce_sum(tensors: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """Sum over ranks, one collective per (dtype, device) of the tensors flattened together."""
    comm = _comm_device(group)
    result: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in _buckets(tensors).values():
        members = [tensors[i] for i in indices]
        flat = _flat(members, None, comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, value in zip(indices, _unflat(flat, members), strict=True):
            result[i] = value
    return result  # type: ignore[return-value]


def all_reduce_mean(tree: Any, *, group: Any = None) -> Any:
    """The mean over ranks of every leaf of ``tree`` (new values; ``tree`` is not modified).

    Floating tensor leaves are averaged as they are: one ``all_reduce(SUM)`` per (dtype,
    device), all leaves flattened into one buffer. Number leaves (Python ``int``/``float``,
    such as metrics) are averaged in one ``float64`` buffer and come back as floats. Any
    pytree works: a :class:`~functional_meta.Gradient`, a ``(grads, metrics)`` pair.
    Identity outside a process group.
    """
    world = _world(group)
    if world == 1:
        return tree
    leaves, spec = optree.tree_flatten(tree)
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    numbers = [
        i for i, x in enumerate(leaves) if isinstance(x, int | float) and not isinstance(x, bool)
    ]
    other = [
        type(x).__name__ for i, x in enumerate(leaves) if i not in tensors and i not in numbers
    ]
    bad = [str(leaves[i].dtype) for i in tensors if not leaves[i].dtype.is_floating_point]
    if other or bad:
        raise TypeError(
            f"all_reduce_mean: expected floating tensors and numbers, got {(other + bad)[0]}"
        )
    parts = [leaves[i] for i in tensors]
    if numbers:
        parts.append(torch.tensor([float(leaves[i]) for i in numbers], dtype=torch.float64))
    summed = _all_reduce_sum(parts, group)
    for i, value in zip(tensors, summed, strict=False):
        leaves[i] = value / world
    if numbers:
        for i, value in zip(numbers, (summed[-1] / world).tolist(), strict=True):
            leaves[i] = value
    return optree.tree_unflatten(spec, leaves)


def broadcast(tree: Any, *, src: int = 0, group: Any = None) -> Any:
    """Every tensor leaf of ``tree`` with rank ``src``'s values (new tensors; one
    ``broadcast`` per (dtype, device)). Use it once at the start so that parameters,
    optimizer state and buffers begin identical everywhere (e.g. ``broadcast(state)``
    for a :class:`~functional_meta.algorithms.TrainState`). Identity outside a process
    group. Every rank must pass a tree of the same structure and shapes."""
    if _world(group) == 1:
        return tree
    leaves, spec, where = _tensor_leaves(tree)
    tensors = [leaves[i] for i in where]
    comm = _comm_device(group)
    for indices in _buckets(tensors).values():
        members = [tensors[i] for i in indices]
        flat = _flat(members, None, comm)
        dist.broadcast(flat, src=src, group=group)
        for i, value in zip(indices, _unflat(flat, members), strict=True):
            leaves[where[i]] = value.clone()
    return optree.tree_unflatten(spec, leaves)


def _leaf_names(tree: Any) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return ["/".join(str(p) for p in path) or "<root>" for path in paths]


def check_in_sync(tree: Any, *, src: int = 0, atol: float = 0.0, group: Any = None) -> None:
    """Raise :class:`DivergenceError` on every rank when any rank's tensors differ from rank
    ``src``'s by more than ``atol`` (default: bitwise identical, which the update
    guarantees). The message names the first diverged tensor (its pytree path), the ranks
    and the largest difference. Two collectives; meant for debugging (``step(...,
    check_sync=True)``). No-op outside a process group."""
    world = _world(group)
    if world == 1:
        return
    reference = broadcast(tree, src=src, group=group)
    leaves, _, where = _tensor_leaves(tree)
    names = _leaf_names(tree)
    ref_leaves = optree.tree_leaves(reference)
    comm = _comm_device(group)
    rank = dist.get_rank(group)
    gaps = torch.zeros(world, len(where), dtype=torch.float64, device=comm)
    for j, i in enumerate(where):
        mine, theirs = leaves[i].detach(), ref_leaves[i]
        if mine.shape != theirs.shape:
            gaps[rank, j] = float("inf")
            continue
        a, b = mine.double(), theirs.double()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        gap = torch.where(same, torch.zeros_like(a), (a - b).abs().nan_to_num(float("inf")))
        gaps[rank, j] = gap.max() if gap.numel() else 0.0
    dist.all_reduce(gaps, op=dist.ReduceOp.SUM, group=group)
    gaps = gaps.cpu()
    bad = gaps > atol
    if bool(bad.any()):
        column = int(bad.any(dim=0).nonzero()[0])
        ranks = bad[:, column].nonzero().flatten().tolist()
        diverged = [names[where[j]] for j in bad.any(dim=0).nonzero().flatten().tolist()]
        raise DivergenceError(
            f"ranks {ranks} hold a different {names[where[column]]!r} than rank {src} "
            f"(max |difference| {float(gaps[:, column].max()):.3g} > atol {atol}); "
            f"{len(diverged)} tensor(s) diverged: {diverged[:5]}"
            f"{' ...' if len(diverged) > 5 else ''}. The ranks ran different updates: "
            "check that every rank uses the same seed for the task stream and the generator"
        )


# -- the data-parallel step ----------------------------------------------------------------
def _agree(error: BaseException | None, group: Any) -> None:
    """One collective in which every rank says whether it succeeded; if any failed, every
    rank raises (the failing one its own error; the others :class:`NonFiniteError` when
    every failure was non-finite, else :class:`DistributedError`)."""
    status = torch.zeros(_world(group), dtype=torch.float64)
    if error is not None:
        status[dist.get_rank(group)] = _NON_FINITE if isinstance(error, NonFiniteError) else _FAILED
    status = _all_reduce_sum([status], group)[0].cpu()
    if not bool((status != _OK).any()):
        return
    if error is not None:
        raise error
    failed = status.nonzero().flatten().tolist()
    if bool((status[status != _OK] == _NON_FINITE).all()):
        raise NonFiniteError(
            f"non-finite meta-gradient on rank(s) {failed} (their tasks); the parameters were "
            "not updated on any rank. Lower the learning rates, clip gradients, or check the data."
        )
    raise DistributedError(
        f"rank(s) {failed} failed while computing the meta-gradient (see their traceback); "
        "stopping this step on every rank"
    )


def data_parallel(grad_fn: Callable[..., T], *, group: Any = None) -> Callable[..., T]:
    """``grad_fn`` averaged over ranks: the returned function has ``grad_fn``'s signature,
    computes it on this rank's arguments (its shard of the tasks) and returns the mean over
    ranks of every tensor and number in the result (:func:`all_reduce_mean`).

    Any gradient function works: an algorithm record's ``grad`` (what ``fit`` and the
    command line use), or ``maml_grad``/``metasgd_grad``/``reptile_grad`` in a user's own
    loop (``distributed.data_parallel(fm.maml_grad)(params, shard(tasks), ...)``). Since
    every algorithm's gradient, metrics and statistics are means over tasks, the mean over
    equal shards is the mean over the whole meta-batch. If ``grad_fn`` raises on some rank,
    every rank raises in the same step instead of waiting in a collective (one small extra
    collective per call). Identity outside a process group.
    """

    def averaged(*args: Any, **kwargs: Any) -> T:
        if _world(group) == 1:
            return grad_fn(*args, **kwargs)
        try:
            result = grad_fn(*args, **kwargs)
        except Exception as error:  # reported to the other ranks, then re-raised here
            _agree(error, group)
            raise
        _agree(None, group)
        return all_reduce_mean(result, group=group)

    return averaged


def step(
    algorithm: Algorithm,
    state: TrainState,
    tasks: TaskBatch,
    optimizer: GradientTransformation,
    *,
    epoch: float = 0.0,
    generator: torch.Generator | None = None,
    check_sync: bool = False,
    group: Any = None,
) -> tuple[TrainState, Metrics]:
    """One data-parallel meta-update: the record's ``grad`` on this rank's tasks averaged
    with :func:`data_parallel`, then the identical :func:`functional_meta.update` on every
    rank. ``check_sync=True`` (debugging) then verifies with :func:`check_in_sync` that the
    new meta-parameters and buffers are identical on every rank. Returns ``(state,
    metrics)`` like :func:`functional_meta.step`; metrics are averaged over ranks."""
    gradient = data_parallel(algorithm.grad, group=group)(
        state.meta_params, state.buffers, tasks, epoch=epoch, generator=generator
    )
    state = update(algorithm, state, gradient, optimizer)
    if check_sync:
        check_in_sync({"meta_params": state.meta_params, "buffers": state.buffers}, group=group)
    return state, gradient.metrics


# -- launching -----------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(
    main: Callable[..., Any],
    *args: Any,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> Any:
    """Run ``main(ctx, *args)`` as one rank: :func:`init` from the torchrun environment
    (single process without it), then :func:`shutdown`. An exception prints
    ``[rank r] Traceback ...`` to stderr and propagates, so the process exits non-zero
    and torchrun stops the other ranks (it also records the error for torchrun's
    summary). Use it as a script's entry point: ``distributed.run(main)``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def entry() -> Any:
        ctx = init(backend, timeout=timeout)
        try:
            return main(ctx, *args)
        except BaseException:
            print(f"[rank {ctx.rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
            raise
        finally:
            with contextlib.suppress(Exception):  # never hide the error behind a teardown one
                shutdown()

    return entry()


def _spawned(
    local_rank: int,
    main: Callable[..., Any],
    nprocs: int,
    port: int,
    backend: str,
    timeout: datetime.timedelta,
    threads: int | None,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    run(main, *args, backend=backend, timeout=timeout)


def spawn(
    main: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    start_method: str = "spawn",
    threads: int | None = None,
) -> None:
    """Run ``main(ctx, *args)`` on ``nprocs`` local ranks with ``torch.multiprocessing``
    (the single-machine alternative to torchrun, for tests and notebooks): sets the torchrun
    variables with ``MASTER_ADDR=127.0.0.1`` and a free port, then :func:`run`. If a rank
    raises, the others are terminated and the error is raised here
    (``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback).
    ``main`` must be importable (a module-level function) unless ``start_method="fork"``;
    ``threads`` sets ``torch.set_num_threads`` in each rank."""
    import torch.multiprocessing as mp

    if not (isinstance(nprocs, int) and nprocs >= 1):
        raise ValueError(f"spawn: nprocs must be an integer >= 1, got {nprocs!r}")
    port = free_port()
    mp.start_processes(
        _spawned,
        args=(main, nprocs, port, backend, timeout, threads, args),
        nprocs=nprocs,
        join=True,
        start_method=start_method,
    )
