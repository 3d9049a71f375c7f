"""N-way K-shot tasks from your own data: a map-style dataset of ``(input, label)`` pairs.

:class:`DatasetSampler` reads the labels once (from ``labels=``, the dataset's ``targets``
attribute, or one pass over the dataset) and then, per meta-batch, draws classes and
example indices exactly as :class:`~functional_meta.data.FewShotSampler` does (it *is* one,
with the same ``draw``), and calls ``dataset[i]`` only for the drawn examples, each
distinct index once per meta-batch. The data set never has to fit in memory; a meta-batch
does. Given the same labels and generator it returns the same tasks as ``FewShotSampler``
on the stacked inputs.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from functional_meta.data.fewshot import ClassAugment, FewShotSampler, _check_labels, _class_index

__all__ = ["DatasetSampler"]

_LARGE = 10_000  # with progress=None, a bar for the label pass only from this many examples


class DatasetSampler(FewShotSampler):
    """Samples N-way K-shot tasks from a dataset, loading only the drawn examples.

    Args:
        dataset: a map-style dataset (``len(dataset)`` and ``dataset[i] -> (input, label)``,
            e.g. a ``torch.utils.data.Dataset`` or a torchvision data set with a transform
            that makes tensors). ``input`` must be a tensor (or anything ``torch.as_tensor``
            takes, e.g. a numpy array) of one shape and dtype for all examples. A plain
            tensor ``[num_examples, *feature]`` is accepted too, with ``labels``: its rows
            are the inputs.
        labels: integer class labels ``[num_examples]`` in index order (a tensor or a
            sequence of ints). When ``None``: the dataset's ``targets`` attribute (the
            torchvision convention) if it has one, else one pass over the dataset reading
            every ``dataset[i]``'s label.
        ways, shots, queries, augment: as for :class:`~functional_meta.data.FewShotSampler`.
        progress: a tqdm bar (when installed; otherwise one line on stderr) for the pass
            that reads the labels. ``None``: only if stderr is a terminal and the dataset
            has at least 10,000 examples.

    Attributes:
        labels: the labels ``[num_examples]`` (long, CPU). labels_from: where they came from
            (``"labels"``, ``"dataset.targets"`` or ``"dataset"``).

    Tasks come out on the device and dtype of the inputs. Raises ``ValueError``/
    ``TypeError`` naming the argument for: labels of the wrong length or type, classes
    with fewer than ``shots + queries`` examples (naming the first and how many),
    ``ways`` larger than the number of classes, an item that is not an ``(input, label)``
    pair, an input that is not a tensor, inputs of different shapes or dtypes (naming both
    indices), and a dataset label that disagrees with ``labels``.
    """

    def __init__(
        self,
        dataset,
        labels: torch.Tensor | Sequence[int] | None = None,
        *,
        ways: int,
        shots: int,
        queries: int,
        augment: ClassAugment | None = None,
        progress: bool | None = None,
    ) -> None:
        where = "DatasetSampler"
        self._init_task_shape(ways, shots, queries, augment, where)
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(
                f"{where}: progress must be a bool or None, got {type(progress).__name__}"
            )
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{where}: dataset is an IterableDataset, which cannot be indexed; "
                "pass a map-style dataset (with __len__ and __getitem__)"
            )
        self._rows = isinstance(dataset, torch.Tensor)
        if self._rows and dataset.dim() < 1:
            raise ValueError(f"{where}: a tensor dataset must be [num_examples, *feature]")
        if not self._rows and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"{where}: dataset must be a map-style dataset (with __len__ and __getitem__) "
                f"or a tensor, got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self._size = len(dataset)
        self._first: tuple[int, torch.Size, torch.dtype, torch.device] | None = None
        if labels is not None:
            self.labels, self.labels_from = _as_labels(labels, "labels", self._size), "labels"
        elif self._rows:
            raise ValueError(f"{where}: labels= is required when dataset is a tensor")
        elif getattr(dataset, "targets", None) is not None:
            targets = dataset.targets
            self.labels = _as_labels(targets, "dataset.targets", self._size)
            self.labels_from = "dataset.targets"
        else:
            self.labels, self.labels_from = self._read_labels(progress), "dataset"
        table, counts, classes = _class_index(self.labels)
        self._init_classes(table, counts, classes, where, f"a dataset of {self._size} examples")

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """The shape of one input, ``*feature``; ``None`` until an example has been loaded."""
        if self._rows:
            return tuple(self.dataset.shape[1:])
        return tuple(self._first[1]) if self._first is not None else None

    def _item(self, index: int) -> tuple[torch.Tensor, object]:
        """``dataset[index]`` as ``(input tensor, label)``, checked against the first input."""
        where = "DatasetSampler"
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = f"a {type(item).__name__}"
            if isinstance(item, (tuple, list)):
                what += f" of {len(item)} items"
            raise TypeError(
                f"{where}: dataset[{index}] is {what}; expected an (input, label) pair "
                "(wrap the dataset, or pass a tensor of inputs with labels=)"
            )
        x, y = item
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(
                    f"{where}: dataset[{index}] has an input of type {type(x).__name__}, not a "
                    "tensor; make the dataset return tensors (e.g. a ToTensor transform)"
                ) from error
        if self._first is None:
            self._first = (index, x.shape, x.dtype, x.device)
        first, shape, dtype, device = self._first
        if x.shape != shape:
            raise ValueError(
                f"{where}: dataset[{index}] has an input of shape {tuple(x.shape)} but "
                f"dataset[{first}] has {tuple(shape)}; all inputs must have one shape "
                "(resize or crop them in the dataset)"
            )
        if x.dtype != dtype or x.device != device:
            raise TypeError(
                f"{where}: dataset[{index}] has an input of {x.dtype} on {x.device} but "
                f"dataset[{first}] has {dtype} on {device}; all inputs must match"
            )
        return x, y

    def _read_labels(self, progress: bool | None) -> torch.Tensor:
        """One pass over the dataset, keeping each item's label (and checking its input)."""
        if progress is None:
            progress = sys.stderr.isatty() and self._size >= _LARGE
        labels = []
        for index in _progress(range(self._size), progress):
            y = self._item(index)[1]
            label = _as_label(y)
            if label is None:
                raise TypeError(
                    f"DatasetSampler: dataset[{index}] has the label {y!r}, not an integer class; "
                    "pass labels= with integer labels"
                )
            labels.append(label)
        return torch.tensor(labels, dtype=torch.long)

    def _load(self, rows: torch.Tensor) -> torch.Tensor:
        """Stack ``dataset[i]``'s input for each index in ``rows``, loading each once."""
        if self._rows:
            return self.dataset.index_select(0, rows.to(self.dataset.device))
        unique, inverse = torch.unique(rows.cpu(), sorted=True, return_inverse=True)
        inputs = []
        for index in unique.tolist():
            x, y = self._item(index)
            label = _as_label(y)
            if label is not None and label != int(self.labels[index]):
                raise ValueError(
                    f"DatasetSampler: dataset[{index}] has label {label} but "
                    f"{self.labels_from}[{index}] is {int(self.labels[index])}; the labels must "
                    "be the dataset's, in index order"
                )
            inputs.append(x)
        stacked = torch.stack(inputs)
        return stacked.index_select(0, inverse.to(stacked.device))

    def __repr__(self) -> str:
        augment = f", augment={self.augment.variants} variants" if self.augment is not None else ""
        return (
            f"DatasetSampler({type(self.dataset).__name__} of {self._size} examples, "
            f"{self.num_classes} classes, labels from {self.labels_from}, ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}{augment})"
        )


def _as_label(y: object) -> int | None:
    """An integer class label from a Python/numpy integer or a 0-d integer tensor, else None."""
    if isinstance(y, torch.Tensor):
        if y.dim() == 0 and not (y.dtype.is_floating_point or y.dtype.is_complex):
            return None if y.dtype == torch.bool else int(y)
        return None
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        return int(y)
    return None


def _as_labels(labels: object, name: str, size: int) -> torch.Tensor:
    """``labels`` (tensor, array or sequence of ints) as a long CPU tensor ``[size]``."""
    where = "DatasetSampler"
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{where}: {name} must be integer class labels (a tensor or a sequence of ints), "
                f"got {type(labels).__name__}"
            ) from error
    _check_labels(labels, where, name, optional=False)
    if labels.dim() != 1 or labels.shape[0] != size:
        raise ValueError(
            f"{where}: {name} must have one label per example, shape ({size},), "
            f"got {tuple(labels.shape)}"
        )
    return labels.to(device="cpu", dtype=torch.long)


def _progress(indices: range, show: bool) -> Iterator[int]:
    """``indices``, with a tqdm bar when ``show`` (or, without tqdm, a line on stderr)."""
    if not show:
        yield from indices
        return
    message = f"DatasetSampler: reading the labels of {len(indices)} examples once"
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(f"{message} (labels= skips this)", file=sys.stderr, flush=True)
        yield from indices
        return
    yield from tqdm(indices, desc=message, unit="ex")
