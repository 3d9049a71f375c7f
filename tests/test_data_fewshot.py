"""N-way K-shot sampling: task structure, label remapping, augmentation, fixed tasks, errors."""

import time

import pytest
import torch

from functional_meta.data import (
    ROT90,
    ClassAugment,
    FewShotSampler,
    FixedTasks,
    TaskBatch,
    fixed_tasks,
    rotate90,
)


def labelled_set(counts, size=2):
    """Images whose every pixel is the example's row index; labels in shuffled order with
    non-contiguous values (10, 20, ...), class ``c`` having ``counts[c]`` examples."""
    labels = torch.cat([torch.full((n,), 10 * (c + 1)) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None, None].expand(
        -1, 1, size, size
    )
    return images.contiguous(), labels


def example_ids(x):
    """Row index of each example from :func:`labelled_set` images ``[T, M, 1, s, s]``."""
    return x[:, :, 0, 0, 0].long()


def check_structure(batch, labels, ways, shots, queries):
    """Every task: N distinct classes, K+Q distinct examples per class, labels consistent."""
    assert batch.support_x.shape[:2] == (batch.num_tasks, ways * shots)
    assert batch.query_x.shape[:2] == (batch.num_tasks, ways * queries)
    assert batch.support_y.dtype == batch.query_y.dtype == torch.long
    for t in range(batch.num_tasks):
        s_ids, q_ids = example_ids(batch.support_x)[t], example_ids(batch.query_x)[t]
        assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == ways * (
            shots + queries
        )  # no overlap
        mapping = {}
        for ids, ys in ((s_ids, batch.support_y[t]), (q_ids, batch.query_y[t])):
            for i, y in zip(ids.tolist(), ys.tolist(), strict=True):
                mapping.setdefault(y, set()).add(int(labels[i]))
        assert sorted(mapping) == list(range(ways))
        assert all(len(v) == 1 for v in mapping.values())  # one original class per label
        assert len({next(iter(v)) for v in mapping.values()}) == ways  # distinct classes
        for y in range(ways):
            assert int((batch.support_y[t] == y).sum()) == shots
            assert int((batch.query_y[t] == y).sum()) == queries


def test_tasks_have_distinct_classes_and_disjoint_support_query():
    images, labels = labelled_set([6] * 8)
    sampler = FewShotSampler(images, labels, ways=5, shots=2, queries=3)
    assert sampler.num_classes == 8 and sampler.feature_shape == (1, 2, 2)
    batch = sampler.sample(40, torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch) and batch.num_tasks == 40
    check_structure(batch, labels, 5, 2, 3)


def test_uneven_class_sizes_never_pick_padding_and_cover_all_examples():
    images, labels = labelled_set([3, 9, 4, 20])
    sampler = FewShotSampler(images, labels, ways=2, shots=1, queries=2)
    batch = sampler.sample(400, 1)
    check_structure(batch, labels, 2, 1, 2)
    seen = set(example_ids(batch.support_x).flatten().tolist()) | set(
        example_ids(batch.query_x).flatten().tolist()
    )
    assert seen == set(range(len(labels)))  # every example of every class is reachable


def test_labels_are_a_random_assignment_per_task():
    images, labels = labelled_set([4] * 5)
    batch = FewShotSampler(images, labels, ways=5, shots=1, queries=1).sample(200, 0)
    first_class = labels[example_ids(batch.support_x)[:, 0]]  # original class given label 0
    assert len(set(first_class.tolist())) == 5
    counts = torch.bincount(first_class // 10 - 1, minlength=5)
    assert counts.min() > 20  # roughly uniform over 200 tasks (expected 40 each)


def test_class_indexed_tensor_matches_labelled_form():
    by_class = torch.randn(6, 5, 3)
    flat_labels = torch.arange(6).repeat_interleave(5)
    a = FewShotSampler(by_class, ways=3, shots=2, queries=2).sample(8, 3)
    b = FewShotSampler(by_class.reshape(30, 3), flat_labels, ways=3, shots=2, queries=2).sample(
        8, 3
    )
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert a.support_x.shape == (8, 6, 3)


def test_reproducible_by_seed_and_generator_advances():
    images, labels = labelled_set([5] * 10)
    sampler = FewShotSampler(images, labels, ways=3, shots=1, queries=2)
    a = sampler.sample(6, torch.Generator().manual_seed(9))
    b = sampler.sample(6, 9)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    g = torch.Generator().manual_seed(9)
    assert not torch.equal(sampler.sample(6, g).support_x, sampler.sample(6, g).support_x)


def test_rotation_classes_are_rotated_copies():
    images = torch.randn(4, 3, 1, 5, 5)  # 4 classes, 3 examples each
    sampler = FewShotSampler(images, ways=4, shots=1, queries=2, augment=ROT90)
    assert sampler.num_classes == 16
    examples, classes = sampler.draw(50, 0)
    batch = sampler.gather(examples, classes)
    flat = images.reshape(12, 1, 5, 5)
    seen_turns = set()
    for t in range(50):
        for n in range(4):
            base, turns = divmod(int(classes[t, n]), 4)
            seen_turns.add(turns)
            rows = examples[t, n]
            assert torch.all(rows // 3 == base)
            expected = torch.rot90(flat[rows], turns, dims=(-2, -1))
            assert torch.equal(batch.support_x[t, n : n + 1], expected[:1])
            assert torch.equal(batch.query_x[t, 2 * n : 2 * n + 2], expected[1:])
    assert seen_turns == {0, 1, 2, 3}


def test_rotate90_matches_torch_rot90_and_checks_input():
    x = torch.randn(3, 2, 4, 2, 6, 6)
    turns = torch.randint(0, 4, (3, 2))
    out = rotate90(x, turns)
    for t in range(3):
        for n in range(2):
            assert torch.equal(out[t, n], torch.rot90(x[t, n], int(turns[t, n]), dims=(-2, -1)))
    assert torch.equal(rotate90(x, turns + 4), out)
    with pytest.raises(ValueError, match="square"):
        rotate90(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="must match the leading dims"):
        rotate90(x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        rotate90(x, turns.float())


def test_custom_class_augment_is_applied_per_class():
    def negate_odd(x, variant):
        sign = 1 - 2 * (variant % 2).to(x.dtype)
        return x * sign.view(*variant.shape, *([1] * (x.dim() - 2)))

    images = torch.rand(5, 4, 3) + 1.0  # positive
    sampler = FewShotSampler(
        images, ways=3, shots=2, queries=1, augment=ClassAugment(2, negate_odd)
    )
    examples, classes = sampler.draw(30, 0)
    batch = sampler.gather(examples, classes)
    sign = (batch.support_x > 0).all(-1)  # [T, N*K]
    expected = (classes % 2 == 0).repeat_interleave(2, dim=1)
    assert torch.equal(sign, expected)
    with pytest.raises(ValueError, match="variants must be >= 1"):
        ClassAugment(0, negate_odd)
    with pytest.raises(TypeError, match="apply must be callable"):
        ClassAugment(2, 3)


def test_fixed_tasks_are_reproducible_and_independent_of_batch_size():
    images, labels = labelled_set([5] * 12)
    sampler = FewShotSampler(images, labels, ways=4, shots=1, queries=2, augment=ROT90)
    evaluation = fixed_tasks(sampler, num_tasks=70, seed=3, batch_size=32)
    assert isinstance(evaluation, FixedTasks)
    assert evaluation.num_tasks == 70 and len(evaluation) == 3
    chunks = list(evaluation)
    assert [c.num_tasks for c in chunks] == [32, 32, 6]
    reference = sampler.sample(70, 3)
    joined = [torch.cat(ts) for ts in zip(*(c.tensors() for c in chunks), strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(joined, reference.tensors(), strict=True))
    other = fixed_tasks(sampler, num_tasks=70, seed=3, batch_size=10)
    assert torch.equal(other[3].query_x, reference.query_x[30:40])
    assert torch.equal(evaluation[-1].support_x, chunks[2].support_x)
    assert len(evaluation[0:2]) == 2
    with pytest.raises(IndexError):
        evaluation[3]
    assert not torch.equal(fixed_tasks(sampler, 70, seed=4)[0].support_x, chunks[0].support_x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ways=0), ValueError, "ways must be >= 1"),
        (dict(shots=0), ValueError, "shots must be >= 1"),
        (dict(queries=0), ValueError, "queries must be >= 1"),
        (dict(shots=1.0), TypeError, "shots must be an int"),
        (dict(ways=7), ValueError, r"ways=7 is larger than the number of classes \(6\)"),
        (
            dict(shots=3, queries=3),
            ValueError,
            r"class 20 has 5 examples, fewer than shots \+ queries",
        ),
        (dict(augment="rot"), TypeError, "augment must be a ClassAugment"),
        (dict(labels=torch.zeros(30)), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.zeros(29, dtype=torch.long)), ValueError, r"labels \[num_examples\]"),
        (dict(images=[1, 2]), TypeError, "images must be a torch.Tensor"),
        (dict(images=torch.randn(3), labels=None), ValueError, "class-indexed"),
    ],
)
def test_sampler_input_checks(kwargs, error, match):
    labels = torch.tensor([10] * 6 + [20] * 5 + [30] * 5 + [40] * 5 + [50] * 5 + [60] * 4)
    args = dict(images=torch.randn(30, 2), labels=labels, ways=2, shots=1, queries=2) | kwargs
    with pytest.raises(error, match=match):
        FewShotSampler(**args)


def test_ways_check_counts_augmented_classes_and_other_checks():
    images = torch.randn(2, 3, 4, 4)
    assert FewShotSampler(images, ways=8, shots=1, queries=1, augment=ROT90).num_classes == 8
    with pytest.raises(ValueError, match=r"\(8 = 2 × 4 variants\)"):
        FewShotSampler(images, ways=9, shots=1, queries=1, augment=ROT90)
    sampler = FewShotSampler(images, ways=2, shots=1, queries=1)
    with pytest.raises(TypeError, match="generator must be"):
        sampler.sample(2, None)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        sampler.sample(0, 0)
    with pytest.raises(TypeError, match="sampler must be a FewShotSampler"):
        fixed_tasks("sampler", 10)
    with pytest.raises(TypeError, match="seed must be an int"):
        fixed_tasks(sampler, 10, seed=None)


def test_sampling_an_omniglot_sized_meta_batch_is_fast():
    # Omniglot meta-train shape: 1200 characters x 20 drawings, 4 rotation classes each.
    images = torch.rand(1200, 20, 1, 28, 28)
    sampler = FewShotSampler(images, ways=5, shots=1, queries=15, augment=ROT90)
    g = torch.Generator().manual_seed(0)
    sampler.sample(32, g)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        batch = sampler.sample(32, g)
        times.append(time.perf_counter() - start)
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.query_x.shape == (
        32,
        75,
        1,
        28,
        28,
    )
    # A few ms when the machine is quiet; the bound is loose for shared CI cores.
    assert min(times) < 0.25
