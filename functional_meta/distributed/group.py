"""The process group: joining it from torchrun's environment, this rank's context, and
launching ranks (``run`` under torchrun, ``spawn`` for local tests and notebooks)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "Context",
    "DistributedError",
    "DivergenceError",
    "context",
    "free_port",
    "init",
    "run",
    "shutdown",
    "spawn",
    "torchrun_env",
    "world_size",
]

DEFAULT_TIMEOUT = datetime.timedelta(seconds=60)
"""How long a collective (and ``init_process_group``) waits for the other ranks."""

_CPU = torch.device("cpu")


class DistributedError(RuntimeError):
    """A distributed run cannot go on consistently (another rank failed, bad environment)."""


class DivergenceError(DistributedError):
    """Ranks that should hold identical tensors do not."""


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


def world_size(group: Any = None) -> int:
    """The number of ranks (1 outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


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
