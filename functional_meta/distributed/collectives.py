"""Collectives over pytrees (mean, broadcast, a divergence check), the check that every rank
runs the same configuration, and the data-parallel gradient built from them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import optree
import torch
import torch.distributed as dist

from functional_meta import steps
from functional_meta.data.tasks import TaskBatch
from functional_meta.distributed.group import _CPU, DistributedError, DivergenceError, world_size
from functional_meta.optim import GradientTransformation
from functional_meta.steps import Algorithm, Metrics, TrainState
from functional_meta.validation import NonFiniteError

__all__ = [
    "all_reduce_mean",
    "broadcast",
    "check_in_sync",
    "check_same_config",
    "data_parallel",
    "step",
]

T = TypeVar("T")
_OK, _NON_FINITE, _FAILED = 0.0, 1.0, 2.0


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


def _flat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).to(device)


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
        flat = _flat(members, comm)
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
    world = world_size(group)
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
    if world_size(group) == 1:
        return tree
    leaves, spec, where = _tensor_leaves(tree)
    tensors = [leaves[i] for i in where]
    comm = _comm_device(group)
    for indices in _buckets(tensors).values():
        members = [tensors[i] for i in indices]
        flat = _flat(members, comm)
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
    world = world_size(group)
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


def check_same_config(
    config: dict[str, Any], *, ignore: Collection[str] = (), group: Any = None
) -> None:
    """Raise ``ValueError`` on every rank when the ranks were started with different
    configurations (another seed, learning rate, ...: they would train different models and
    average meaningless gradients). Each rank's ``config`` (a dict of JSON-like settings,
    less the keys in ``ignore``, e.g. a per-rank device) is hashed and gathered with one
    ``all_gather_object``; the message names each differing setting and its values on rank
    0 and on the first rank that disagrees. No-op outside a process group."""
    world = world_size(group)
    if world == 1:
        return
    mine = {key: value for key, value in config.items() if key not in ignore}
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=repr).encode()).hexdigest()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (digest, mine), group=group)
    ranks = [rank for rank, (other, _) in enumerate(gathered) if other != gathered[0][0]]
    if not ranks:
        return
    reference, other = gathered[0][1], gathered[ranks[0]][1]
    keys = sorted(k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k))
    shown = ", ".join(
        f"{key} is {reference.get(key)!r} on rank 0 but {other.get(key)!r} on rank {ranks[0]}"
        for key in keys
    )
    raise ValueError(
        f"the ranks disagree on the configuration: {shown} (ranks {ranks} differ from rank "
        "0); start every rank with the same arguments"
    )


# -- the data-parallel step ----------------------------------------------------------------
def _agree(error: BaseException | None, group: Any) -> None:
    """One collective in which every rank says whether it succeeded; if any failed, every
    rank raises (the failing one its own error; the others :class:`NonFiniteError` when
    every failure was non-finite, else :class:`DistributedError`)."""
    status = torch.zeros(world_size(group), dtype=torch.float64)
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
        if world_size(group) == 1:
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
    check_sync: bool = False,
    group: Any = None,
    **progress: Any,
) -> tuple[TrainState, Metrics]:
    """One data-parallel meta-update: :func:`functional_meta.step` with the record's
    ``grad`` averaged over ranks (:func:`data_parallel`), so every rank applies the
    identical update; ``progress`` (``epoch``, ``generator``) as for that function.
    ``check_sync=True`` (debugging) then verifies with :func:`check_in_sync` that the new
    meta-parameters and buffers are identical on every rank. Returns ``(state, metrics)``;
    metrics are averaged over ranks."""
    gradient = data_parallel(algorithm.grad, group=group)
    state, metrics = steps.step(algorithm, state, tasks, optimizer, gradient=gradient, **progress)
    if check_sync:
        check_in_sync({"meta_params": state.meta_params, "buffers": state.buffers}, group=group)
    return state, metrics
