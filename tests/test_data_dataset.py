"""DatasetSampler: tasks from a dataset of (input, label) pairs, loading only the drawn
examples, equal to FewShotSampler's tasks on the same data held in memory."""

import sys

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from functional_meta.data import ROT90, DatasetSampler, FewShotSampler, TaskBatch, fixed_tasks


def labelled(counts=(6, 9, 5, 7, 6, 8), size=3, seed=0):
    """Random square inputs ``[E, 1, size, size]`` and shuffled labels 10, 20, ... with
    ``counts[c]`` examples of class ``c``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), 10 * (c + 1)) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.randn(len(labels), 1, size, size, generator=g), labels


class Counting(Dataset):
    """(input, label) pairs from tensors, recording every index asked for."""

    def __init__(self, inputs, labels, targets=False, item=None):
        self.inputs, self._labels, self.calls = inputs, labels, []
        if targets:
            self.targets = labels.tolist()
        self.item = item

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        self.calls.append(i)
        if self.item is not None:
            return self.item(i, self.inputs[i], int(self._labels[i]))
        return self.inputs[i], int(self._labels[i])


class Stream(IterableDataset):
    def __iter__(self):
        yield from []


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


@pytest.mark.parametrize("augment", [None, ROT90])
def test_same_tasks_as_fewshotsampler_on_the_tensors(augment):
    inputs, labels = labelled()
    shape = dict(ways=4, shots=2, queries=3, augment=augment)
    reference = FewShotSampler(inputs, labels, **shape)
    sampler = DatasetSampler(Counting(inputs, labels), labels, **shape)
    assert sampler.num_classes == reference.num_classes
    assert torch.equal(sampler.class_labels, reference.class_labels)
    for seed in (0, 1, 7):
        batch = sampler.sample(16, seed)
        assert isinstance(batch, TaskBatch) and same(batch, reference.sample(16, seed))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):  # the generator advances identically
        assert same(sampler.sample(5, g1), reference.sample(5, g2))
    ours = fixed_tasks(sampler, 20, seed=2, batch_size=8)
    theirs = fixed_tasks(reference, 20, seed=2, batch_size=8)
    assert all(same(a, b) for a, b in zip(ours, theirs, strict=True))
    assert sampler.feature_shape == (1, 3, 3)


def test_only_the_drawn_examples_are_loaded_each_once_per_meta_batch():
    inputs, labels = labelled()
    dataset = Counting(inputs, labels)
    sampler = DatasetSampler(dataset, labels, ways=3, shots=1, queries=2)
    assert dataset.calls == [] and sampler.feature_shape is None  # labels given: nothing read
    examples, classes = sampler.draw(6, 0)
    batch = sampler.gather(examples, classes)
    drawn = examples.flatten().tolist()
    assert sorted(dataset.calls) == sorted(set(drawn))  # each drawn example once, no other
    assert len(set(drawn)) < len(drawn)  # (tasks of one meta-batch did share examples)
    assert same(batch, FewShotSampler(inputs, labels, ways=3, shots=1, queries=2).sample(6, 0))


def test_labels_from_targets_or_from_one_pass_give_the_same_tasks():
    inputs, labels = labelled()
    given = DatasetSampler(Counting(inputs, labels), labels, ways=3, shots=2, queries=2)
    with_targets = Counting(inputs, labels, targets=True)
    from_targets = DatasetSampler(with_targets, ways=3, shots=2, queries=2)
    assert with_targets.calls == [] and from_targets.labels_from == "dataset.targets"
    plain = Counting(inputs, labels)
    from_pass = DatasetSampler(plain, ways=3, shots=2, queries=2, progress=False)
    assert plain.calls == list(range(len(labels))) and from_pass.labels_from == "dataset"
    assert given.labels_from == "labels"
    for sampler in (from_targets, from_pass):
        assert torch.equal(sampler.labels, labels)
        assert same(sampler.sample(10, 4), given.sample(10, 4))


def test_tensor_dataset_plain_tensors_and_numpy_inputs():
    inputs, labels = labelled()
    reference = FewShotSampler(inputs, labels, ways=3, shots=1, queries=1).sample(8, 0)
    pairs = DatasetSampler(TensorDataset(inputs, labels), ways=3, shots=1, queries=1)
    assert same(pairs.sample(8, 0), reference)  # labels read from the 0-d label tensors
    rows = DatasetSampler(inputs, labels.tolist(), ways=3, shots=1, queries=1)
    assert same(rows.sample(8, 0), reference) and rows.feature_shape == (1, 3, 3)
    np = pytest.importorskip("numpy")
    arrays = Counting(inputs, labels, item=lambda i, x, y: (x.numpy(), np.int64(y)))
    assert same(DatasetSampler(arrays, ways=3, shots=1, queries=1).sample(8, 0), reference)


def test_progress_for_the_label_pass(capsys, monkeypatch):
    inputs, labels = labelled()
    DatasetSampler(Counting(inputs, labels), ways=2, shots=1, queries=1, progress=True)
    assert "reading the labels of 41 examples once" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: one line
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    DatasetSampler(Counting(inputs, labels), ways=2, shots=1, queries=1, progress=True)
    err = capsys.readouterr().err
    assert "reading the labels of 41 examples once (labels= skips this)" in err
    DatasetSampler(Counting(inputs, labels), ways=2, shots=1, queries=1)  # small: no message
    assert capsys.readouterr().err == ""


def test_a_class_with_too_few_examples_is_named():
    inputs, labels = labelled(counts=(6, 3, 5, 2))
    with pytest.raises(ValueError, match=r"class 20 has 3 examples, fewer than .* = 4 \(2 class"):
        DatasetSampler(Counting(inputs, labels), labels, ways=2, shots=2, queries=2)
    with pytest.raises(ValueError, match=r"ways=5 is larger than the number of classes \(4\)"):
        DatasetSampler(Counting(inputs, labels), labels, ways=5, shots=1, queries=1)


@pytest.mark.parametrize(
    "item, error, match",
    [
        (lambda i, x, y: x, TypeError, r"dataset\[\d+\] is a Tensor; expected an \(input, label\)"),
        (lambda i, x, y: (x, y, "extra"), TypeError, r"is a tuple of 3 items; expected an"),
        (lambda i, x, y: ("text", y), TypeError, r"input of type str, not a tensor"),
        (
            lambda i, x, y: (x[:, :2] if i == 5 else x, y),
            ValueError,
            r"dataset\[5\] has an input of shape \(1, 2, 3\) but dataset\[0\] has \(1, 3, 3\)",
        ),
        (
            lambda i, x, y: (x.double() if i == 7 else x, y),
            TypeError,
            r"dataset\[7\] has an input of torch.float64",
        ),
        (
            lambda i, x, y: (x, "cat"),
            TypeError,
            r"dataset\[0\] has the label 'cat', not an integer",
        ),
        (
            lambda i, x, y: (x, torch.tensor([y])),
            TypeError,
            r"label tensor\(\[\d+\]\), not an integer",
        ),
    ],
)
def test_malformed_items_are_named_by_index(item, error, match):
    inputs, labels = labelled()
    with pytest.raises(error, match=match):
        DatasetSampler(Counting(inputs, labels, item=item), ways=2, shots=1, queries=1)


def test_malformed_items_found_when_loading_tasks():
    inputs, labels = labelled()
    odd = Counting(inputs, labels, item=lambda i, x, y: (x if i % 2 else x[:, :2], y))
    sampler = DatasetSampler(odd, labels, ways=6, shots=4, queries=1)  # labels given: no pass
    with pytest.raises(ValueError, match=r"has an input of shape .* but dataset\[\d+\] has"):
        sampler.sample(2, 0)
    shifted = Counting(inputs, labels, item=lambda i, x, y: (x, y + 1))
    sampler = DatasetSampler(shifted, labels, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"dataset\[\d+\] has label \d+ but labels\[\d+\] is"):
        sampler.sample(1, 0)


@pytest.mark.parametrize(
    "dataset, kwargs, error, match",
    [
        (
            "inputs",
            dict(labels=torch.zeros(40, dtype=torch.long)),
            ValueError,
            r"labels must have one label per example, shape \(41,\)",
        ),
        ("inputs", dict(labels=torch.zeros(41)), TypeError, "labels must be an integer tensor"),
        ("inputs", dict(labels=["a"] * 41), TypeError, "labels must be integer class labels"),
        ("inputs", dict(), ValueError, "labels= is required when dataset is a tensor"),
        ("targets", dict(), ValueError, r"dataset.targets must have one label per example"),
        (Stream(), dict(), TypeError, "IterableDataset, which cannot be indexed"),
        (42, dict(), TypeError, "dataset must be a map-style dataset .* got int"),
        ("inputs", dict(progress="yes"), TypeError, "progress must be a bool or None"),
        ("inputs", dict(shots=0), ValueError, "shots must be >= 1"),
    ],
)
def test_argument_checks(dataset, kwargs, error, match):
    inputs, labels = labelled()
    if dataset == "inputs":
        dataset = inputs
    elif dataset == "targets":
        dataset = Counting(inputs, labels, targets=True)
        dataset.targets = dataset.targets[:-1]
    args = dict(ways=2, shots=1, queries=1) | kwargs
    with pytest.raises(error, match=match):
        DatasetSampler(dataset, **args)
