"""N-way K-shot task sampling from any labelled tensor set.

A task picks ``N`` classes without replacement, then ``K + Q`` distinct examples of each
class (``K`` support, ``Q`` query, no overlap). Within a task the ``N`` classes come in a
random order and class ``n`` of that order gets label ``n``, so the labels ``0..N-1`` are a
fresh random assignment per task. Examples are laid out class by class::

    support_x [T, N*K, *feature]   support_y [T, N*K] = [0]*K + [1]*K + ... + [N-1]*K
    query_x   [T, N*Q, *feature]   query_y   [T, N*Q] = [0]*Q + ... + [N-1]*Q

The whole meta-batch is drawn with a handful of tensor operations (``rand`` + ``topk`` for
the choices, one gather for the images): no per-task Python on the hot path.

An optional :class:`ClassAugment` turns every class into ``variants`` classes, applied when
a task is drawn (``ROT90``: the 4 rotation classes of Omniglot, without storing 4 copies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from functional_meta.data.tasks import TaskBatch, _as_generator, _check_count

__all__ = ["ROT90", "ClassAugment", "FewShotSampler", "FixedTasks", "fixed_tasks", "rotate90"]


def rotate90(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each group of images by ``turns × 90°`` counter-clockwise (``torch.rot90``).

    ``images [*lead, ..., H, W]`` with ``H == W``; ``turns`` an integer tensor of shape
    ``lead`` (e.g. ``images [T, N, M, C, H, W]`` and ``turns [T, N]``, one rotation per
    class of each task). Returns a new tensor of ``images``' shape; the input is not modified.
    """
    if not isinstance(images, torch.Tensor) or not isinstance(turns, torch.Tensor):
        raise TypeError("rotate90: images and turns must be torch.Tensors")
    if images.dim() < turns.dim() + 2 or images.shape[: turns.dim()] != turns.shape:
        raise ValueError(
            f"rotate90: turns {tuple(turns.shape)} must match the leading dims of images "
            f"{tuple(images.shape)} (which need two more trailing dims H, W)"
        )
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate90: images must be square (H == W), got {tuple(images.shape)}")
    if turns.dtype.is_floating_point or turns.dtype == torch.bool:
        raise TypeError(f"rotate90: turns must be an integer tensor, got {turns.dtype}")
    size = images.shape[-1]
    # One gather with a pixel permutation per rotation: much faster than masking and
    # copying torch.rot90 views of small images.
    pixels = torch.arange(size * size, device=images.device).view(size, size)
    table = torch.stack([torch.rot90(pixels, k, dims=(0, 1)).reshape(-1) for k in range(4)])
    flat = images.reshape(*turns.shape, -1, size * size)
    index = table[turns.to(images.device) % 4].unsqueeze(-2).expand(flat.shape)
    return flat.gather(-1, index).view(images.shape)


def _pick(
    generator: torch.Generator,
    shape: tuple[int, ...],
    k: int,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``k`` distinct positions along the last axis of ``shape``, uniformly at random and in
    random order (``rand`` + ``topk``), drawn on the generator's device. Positions where
    ``allowed`` (broadcast to ``shape``) is False are never picked; the caller guarantees at
    least ``k`` allowed positions in every row."""
    keys = torch.rand(*shape, generator=generator, device=generator.device)
    if allowed is not None:
        keys = keys.masked_fill(~allowed, -1.0)
    return keys.topk(k, dim=-1).indices


def _check_labels(labels: object, where: str, name: str = "labels", optional: bool = True) -> None:
    """TypeError unless ``labels`` is an integer tensor (``optional``: the message says that
    ``None`` is also accepted, which the caller handles)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{where}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
            f"got {type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must be an integer tensor, got {labels.dtype}")


def _class_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(table [C, W], counts [C], classes [C])`` for integer ``labels [num_examples]``:
    the distinct labels in ascending order, how many examples each has, and
    ``table[c, j]``, the index of the ``j``-th example of class ``c`` (in index order; rows
    of smaller classes are padded with their last index)."""
    classes, inverse, counts = torch.unique(
        labels.cpu(), sorted=True, return_inverse=True, return_counts=True
    )
    if not counts.numel():
        return torch.zeros(0, 0, dtype=torch.long), counts, classes
    order = torch.sort(inverse, stable=True).indices  # examples grouped by class
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.max()))
    slot = starts[:, None] + torch.minimum(offsets[None, :], counts[:, None] - 1)
    return order[slot], counts, classes


@dataclass(frozen=True)
class ClassAugment:
    """Turn every class into ``variants`` distinct classes.

    ``apply(images [T, N, M, *feature], variant [T, N] long) -> [T, N, M, *feature]``
    transforms all ``M = K + Q`` examples of class ``n`` of task ``t`` by variant
    ``variant[t, n]`` (in ``0..variants-1``; variant 0 should be the identity). It must be
    deterministic: the randomness is in which (class, variant) pairs a task draws.
    """

    variants: int
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        _check_count(self.variants, "variants", "ClassAugment")
        if not callable(self.apply):
            raise TypeError(
                f"ClassAugment: apply must be callable, got {type(self.apply).__name__}"
            )


ROT90 = ClassAugment(variants=4, apply=rotate90)
"""Rotation classes (Omniglot protocol): each class in 4 copies rotated by 0, 90, 180, 270°."""


class FewShotSampler:
    """Samples meta-batches of N-way K-shot tasks from a labelled tensor set.

    Args:
        images: ``[num_examples, *feature]`` with ``labels [num_examples]``, or a
            class-indexed tensor ``[num_classes, per_class, *feature]`` with ``labels=None``.
            It is indexed, not copied; the tasks come out on its device and dtype.
        labels: integer class labels ``[num_examples]`` (any values; classes are the
            distinct values, ordered ascending) or ``None`` for a class-indexed ``images``.
        ways: ``N``, classes per task. shots: ``K``, support examples per class.
        queries: ``Q``, query examples per class. All >= 1.
        augment: an optional :class:`ClassAugment` (e.g. :data:`ROT90`), which multiplies
            the number of classes by ``augment.variants``.

    Raises ``ValueError`` when ``N`` exceeds the number of classes or some class has fewer
    than ``K + Q`` examples (naming the class), ``TypeError`` for wrong argument types.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        ways: int,
        shots: int,
        queries: int,
        augment: ClassAugment | None = None,
    ) -> None:
        where = type(self).__name__
        self._init_task_shape(ways, shots, queries, augment, where)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{where}: images must be a torch.Tensor, got {type(images).__name__}")
        if labels is None:
            if images.dim() < 2:
                raise ValueError(
                    f"{where}: with labels=None, images must be class-indexed "
                    f"[num_classes, per_class, *feature], got {tuple(images.shape)}"
                )
            num_classes, per_class = images.shape[:2]
            self._images = images.reshape(num_classes * per_class, *images.shape[2:])
            table = torch.arange(num_classes * per_class).view(num_classes, per_class)
            counts = torch.full((num_classes,), per_class, dtype=torch.long)
            classes = torch.arange(num_classes)
        else:
            _check_labels(labels, where)
            if images.dim() < 1 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"{where}: expected images [num_examples, *feature] and labels [num_examples], "
                    f"got images {tuple(images.shape)} and labels {tuple(labels.shape)}"
                )
            self._images = images
            table, counts, classes = _class_index(labels)
        self._init_classes(table, counts, classes, where, f"images {tuple(images.shape)}")

    def _init_task_shape(
        self, ways: int, shots: int, queries: int, augment: ClassAugment | None, where: str
    ) -> None:
        """Check and set ``ways``, ``shots``, ``queries`` and ``augment``."""
        self.ways = _check_count(ways, "ways", where)
        self.shots = _check_count(shots, "shots", where)
        self.queries = _check_count(queries, "queries", where)
        if augment is not None and not isinstance(augment, ClassAugment):
            raise TypeError(
                f"{where}: augment must be a ClassAugment or None, got {type(augment).__name__}"
            )
        self.augment = augment

    def _init_classes(
        self,
        table: torch.Tensor,
        counts: torch.Tensor,
        classes: torch.Tensor,
        where: str,
        described: str,
    ) -> None:
        """Set the class index from :func:`_class_index` (or a class-indexed equivalent) and
        check that every class has ``K + Q`` examples and that there are ``N`` classes."""
        per_task = self.shots + self.queries
        self._table, self._counts, self.class_labels = table, counts, classes
        if counts.numel() == 0:
            raise ValueError(f"{where}: no classes to sample from, got {described}")
        short = (counts < per_task).nonzero().flatten()
        if short.numel():
            c = int(short[0])
            raise ValueError(
                f"{where}: class {int(classes[c])} has {int(counts[c])} examples, "
                f"fewer than shots + queries = {self.shots} + {self.queries} = {per_task} "
                f"({short.numel()} class(es) too small); drop them or lower shots/queries"
            )
        self._full = bool((counts == table.shape[1]).all())
        variants = self.augment.variants if self.augment is not None else 1
        self.num_classes = int(counts.numel()) * variants
        if self.ways > self.num_classes:
            raise ValueError(
                f"{where}: ways={self.ways} is larger than the number of classes "
                f"({self.num_classes}{f' = {counts.numel()} × {variants} variants' if variants > 1 else ''})"
            )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example, ``*feature``."""
        return tuple(self._images.shape[1:])

    def draw(
        self, num_tasks: int, generator: torch.Generator | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the indices of ``num_tasks`` tasks without gathering any images.

        Returns ``(examples [T, N, K+Q], classes [T, N])``: row indices into the flattened
        image set (support first, then query, per class) and the drawn class ids in
        ``0..num_classes-1`` (with an augment, ``base_class * variants + variant``). Made on
        the generator's device. :meth:`gather` turns them into a :class:`TaskBatch`.
        """
        num_tasks = _check_count(num_tasks, "num_tasks", "FewShotSampler.draw")
        generator = _as_generator(generator, "FewShotSampler.draw")
        device = generator.device
        classes = _pick(generator, (num_tasks, self.num_classes), self.ways)
        variants = self.augment.variants if self.augment is not None else 1
        base = classes // variants
        table, counts = self._table.to(device), self._counts.to(device)
        allowed = None
        if not self._full:  # never pick the padding of classes smaller than the widest one
            allowed = torch.arange(table.shape[1], device=device) < counts[base][..., None]
        shape = (num_tasks, self.ways, table.shape[1])
        slots = _pick(generator, shape, self.shots + self.queries, allowed)  # K+Q distinct
        return table[base[..., None], slots], classes

    def gather(self, examples: torch.Tensor, classes: torch.Tensor) -> TaskBatch:
        """Build the :class:`TaskBatch` for indices from :meth:`draw` (deterministic)."""
        num_tasks = examples.shape[0]
        rows = self._load(examples.reshape(-1))
        x = rows.view(*examples.shape, *rows.shape[1:])
        if self.augment is not None:
            variant = (classes % self.augment.variants).to(x.device)
            x = self.augment.apply(x, variant)
        k, feature = self.shots, tuple(rows.shape[1:])
        labels = torch.arange(self.ways, device=x.device)
        return TaskBatch(
            x[:, :, :k].reshape(num_tasks, self.ways * k, *feature),
            labels.repeat_interleave(k).repeat(num_tasks, 1),
            x[:, :, k:].reshape(num_tasks, self.ways * self.queries, *feature),
            labels.repeat_interleave(self.queries).repeat(num_tasks, 1),
        )

    def _load(self, rows: torch.Tensor) -> torch.Tensor:
        """The examples at flat row indices ``rows [M]`` as one tensor ``[M, *feature]``."""
        return self._images.index_select(0, rows.to(self._images.device))

    def sample(self, num_tasks: int, generator: torch.Generator | int) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks: ``support_x [T, N*K, *feature]``,
        ``support_y [T, N*K]``, ``query_x [T, N*Q, *feature]``, ``query_y [T, N*Q]`` (long).

        ``generator``: a ``torch.Generator`` or an int seed; same state, same tasks.
        """
        return self.gather(*self.draw(num_tasks, generator))

    def __repr__(self) -> str:
        augment = f", augment={self.augment.variants} variants" if self.augment is not None else ""
        return (
            f"FewShotSampler({self.num_classes} classes, feature {self.feature_shape}, "
            f"ways={self.ways}, shots={self.shots}, queries={self.queries}{augment})"
        )


class FixedTasks(Sequence[TaskBatch]):
    """A reproducible evaluation set, iterated in meta-batches (see :func:`fixed_tasks`).

    Holds only the drawn indices; each meta-batch is gathered when indexed. ``len()`` is
    the number of meta-batches; ``num_tasks`` the number of tasks.
    """

    def __init__(
        self,
        sampler: FewShotSampler,
        examples: torch.Tensor,
        classes: torch.Tensor,
        batch_size: int,
    ):
        self.sampler = sampler
        self.examples = examples
        self.classes = classes
        self.batch_size = batch_size

    @property
    def num_tasks(self) -> int:
        return self.examples.shape[0]

    def __len__(self) -> int:
        return -(-self.num_tasks // self.batch_size)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(
                f"FixedTasks: meta-batch {index} out of range for {len(self)} meta-batches"
            )
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.sampler.gather(self.examples[part], self.classes[part])

    def __iter__(self) -> Iterator[TaskBatch]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"FixedTasks({self.num_tasks} tasks in {len(self)} meta-batches of {self.batch_size}, {self.sampler})"


def fixed_tasks(
    sampler: FewShotSampler, num_tasks: int = 600, seed: int = 0, batch_size: int = 32
) -> FixedTasks:
    """A fixed list of ``num_tasks`` evaluation tasks, the same for every algorithm.

    All tasks are drawn at once from ``torch.Generator().manual_seed(seed)`` (on the CPU), so
    task ``i`` depends only on the sampler's data and settings, ``num_tasks`` and ``seed`` —
    not on ``batch_size``: it equals ``sampler.sample(num_tasks, seed)[i]``. Iterating yields
    :class:`TaskBatch` meta-batches of ``batch_size`` tasks (the last may be smaller),
    gathered lazily, so 600 tasks never sit in memory at once.
    """
    where = "fixed_tasks"
    if not isinstance(sampler, FewShotSampler):
        raise TypeError(f"{where}: sampler must be a FewShotSampler, got {type(sampler).__name__}")
    num_tasks = _check_count(num_tasks, "num_tasks", where)
    batch_size = _check_count(batch_size, "batch_size", where)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    examples, classes = sampler.draw(num_tasks, torch.Generator().manual_seed(seed))
    return FixedTasks(sampler, examples, classes, batch_size)
