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

from functional_meta.distributed.collectives import (
    all_reduce_mean,
    broadcast,
    check_in_sync,
    check_same_config,
    data_parallel,
    step,
)
from functional_meta.distributed.group import (
    DEFAULT_TIMEOUT,
    Context,
    DistributedError,
    DivergenceError,
    context,
    free_port,
    init,
    run,
    shutdown,
    spawn,
    torchrun_env,
    world_size,
)
from functional_meta.distributed.sharding import sample_shard, shard, shard_stream

__all__ = [
    "DEFAULT_TIMEOUT",
    "Context",
    "DistributedError",
    "DivergenceError",
    "all_reduce_mean",
    "broadcast",
    "check_in_sync",
    "check_same_config",
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
    "world_size",
]
