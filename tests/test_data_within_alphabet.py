"""Within-alphabet tasks with support and query by different drawers (Lake et al.'s
protocol) on synthetic data whose every example records its class and drawer; the real
Omniglot checks are in test_data_omniglot.py."""

import pytest
import torch

from functional_meta.data import (
    ROT90,
    FewShotSampler,
    FixedTasks,
    TaskBatch,
    WithinAlphabetSampler,
    fixed_tasks,
    within_alphabet_tasks,
)

# 5 alphabets with 6, 3, 8, 5, 2 classes (ids 10, 11, ... to show ids need not start at 0).
SIZES = (6, 3, 8, 5, 2)
ALPHABETS = torch.cat([torch.full((n,), 10 + a) for a, n in enumerate(SIZES)])
NUM_CLASSES, NUM_DRAWERS = len(ALPHABETS), 7


def synthetic(seed=0):
    """Class-indexed images ``[C, 7, 2]`` with ``x[c, j] = (c, drawer)``; each class lists
    its drawers (ids 101..107) in its own random order."""
    g = torch.Generator().manual_seed(seed)
    drawers = torch.stack([torch.randperm(NUM_DRAWERS, generator=g) for _ in range(NUM_CLASSES)])
    drawers = drawers + 101
    classes = torch.arange(NUM_CLASSES)[:, None].expand(-1, NUM_DRAWERS)
    images = torch.stack([classes, drawers], dim=-1).to(torch.float32)
    return images, drawers


def sampler_for(**kwargs):
    images, drawers = synthetic()
    args = dict(alphabets=ALPHABETS, drawers=drawers, ways=4, shots=2, queries=2) | kwargs
    return WithinAlphabetSampler(images, **args)


def content(x):
    """(class, drawer) of every example of ``x [T, M, 2]``."""
    return x[..., 0].long(), x[..., 1].long()


def check_tasks(batch, ways, shots, queries, support_drawers=None):
    """Every task: classes from one alphabet, support and query drawers disjoint, distinct
    drawers within a class, labels in the class-by-class layout."""
    assert isinstance(batch, TaskBatch)
    t = batch.num_tasks
    assert batch.support_x.shape == (t, ways * shots, 2)
    assert batch.query_x.shape == (t, ways * queries, 2)
    labels = torch.arange(ways)
    assert torch.equal(batch.support_y, labels.repeat_interleave(shots).expand(t, -1))
    assert torch.equal(batch.query_y, labels.repeat_interleave(queries).expand(t, -1))
    s_class, s_drawer = content(batch.support_x)
    q_class, q_drawer = content(batch.query_x)
    for i in range(t):
        classes = s_class[i].view(ways, shots)
        assert torch.all(classes == classes[:, :1]) and len(set(classes[:, 0].tolist())) == ways
        assert torch.equal(q_class[i].view(ways, queries), classes[:, :1].expand(-1, queries))
        assert len(set(ALPHABETS[classes[:, 0]].tolist())) == 1  # one alphabet per task
        support, query = set(s_drawer[i].tolist()), set(q_drawer[i].tolist())
        assert not support & query  # no drawer on both sides
        if support_drawers is not None:
            assert len(support) == support_drawers
        for n in range(ways):
            assert len(set(s_drawer[i].view(ways, shots)[n].tolist())) == shots
            assert len(set(q_drawer[i].view(ways, queries)[n].tolist())) == queries


def test_tasks_are_within_one_alphabet_with_disjoint_drawers():
    sampler = sampler_for()
    assert sampler.alphabets == (10, 12, 13) and sampler.skipped_alphabets == (11, 14)
    assert sampler.drawers == tuple(range(101, 108))
    assert (sampler.support_drawers, sampler.query_drawers) == (2, 5)  # defaults: K, the rest
    batch = sampler.sample(300, 0)
    check_tasks(batch, 4, 2, 2, support_drawers=2)
    s_class, s_drawer = content(batch.support_x)
    _, q_drawer = content(batch.query_x)
    # Every qualifying alphabet is drawn, no skipped one; every drawer serves on both sides.
    assert set(ALPHABETS[s_class[:, 0]].tolist()) == {10, 12, 13}
    assert (
        set(s_drawer.flatten().tolist()) == set(q_drawer.flatten().tolist()) == set(range(101, 108))
    )
    # The indices from draw agree with the images and with the helpers.
    examples, classes = sampler.draw(300, 0)
    assert torch.equal(sampler.task_alphabets(classes)[:, 0], ALPHABETS[s_class[:, 0]])
    drawers = sampler.example_drawers(examples)  # [T, N, K+Q]
    assert torch.equal(drawers[:, :, :2].reshape(300, -1), s_drawer)
    assert torch.equal(drawers[:, :, 2:].reshape(300, -1), q_drawer)


def test_one_support_drawer_and_one_query_drawer_per_task():
    sampler = sampler_for(ways=5, shots=1, queries=1, support_drawers=1, query_drawers=1)
    batch = sampler.sample(100, 3)
    check_tasks(batch, 5, 1, 1, support_drawers=1)
    _, q_drawer = content(batch.query_x)
    assert all(len(set(row.tolist())) == 1 for row in q_drawer)


def test_larger_drawer_pools():
    sampler = sampler_for(ways=3, shots=1, queries=3, support_drawers=3, query_drawers=4)
    batch = sampler.sample(200, 1)
    check_tasks(batch, 3, 1, 3)
    _, s_drawer = content(batch.support_x)
    assert max(len(set(row.tolist())) for row in s_drawer) == 3


def test_deterministic_under_a_seed_and_generator_advances():
    sampler = sampler_for()
    a = sampler.sample(20, torch.Generator().manual_seed(5))
    b = sampler.sample(20, 5)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    again = sampler_for().sample(20, 5)  # a fresh sampler on the same data
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), again.tensors(), strict=True))
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(sampler.sample(20, g).support_x, sampler.sample(20, g).support_x)


def test_labelled_form_gives_the_same_tasks_as_the_class_indexed_form():
    images, drawers = synthetic()
    flat = WithinAlphabetSampler(
        images.reshape(-1, 2),
        torch.arange(NUM_CLASSES).repeat_interleave(NUM_DRAWERS) * 3,  # labels 0, 3, 6, ...
        alphabets=ALPHABETS,
        drawers=drawers.reshape(-1),
        ways=4,
        shots=2,
        queries=2,
    )
    a, b = flat.sample(30, 2), sampler_for().sample(30, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_fixed_set_has_the_same_number_of_tasks_in_every_alphabet():
    sampler = sampler_for()
    tasks = within_alphabet_tasks(sampler, tasks_per_alphabet=7, seed=4, batch_size=5)
    assert isinstance(tasks, FixedTasks) and tasks.num_tasks == 21 and len(tasks) == 5
    alphabets = sampler.task_alphabets(tasks.classes)
    assert torch.all(alphabets == alphabets[:, :1])
    assert alphabets[:, 0].tolist() == [10] * 7 + [12] * 7 + [13] * 7  # alphabet by alphabet
    chunks = list(tasks)
    joined = [torch.cat(ts) for ts in zip(*(c.tensors() for c in chunks), strict=True)]
    check_tasks(TaskBatch(*joined), 4, 2, 2, support_drawers=2)
    # Independent of batch_size, reproducible from the seed, different for another seed.
    other = within_alphabet_tasks(sampler, tasks_per_alphabet=7, seed=4, batch_size=32)
    assert torch.equal(other[0].support_x, joined[0])
    assert torch.equal(other[0].query_x, joined[2])
    assert not torch.equal(within_alphabet_tasks(sampler, 7, seed=5)[0].support_x, joined[0])
    explicit = sampler.draw_in(torch.tensor([10] * 7 + [12] * 7 + [13] * 7), 4)
    assert torch.equal(explicit[0], tasks.examples) and torch.equal(explicit[1], tasks.classes)
    # fixed_tasks works on the sampler too (each task's alphabet at random).
    check_tasks(fixed_tasks(sampler, 40, seed=0, batch_size=40)[0], 4, 2, 2)


def test_rotation_classes_share_their_alphabet():
    sampler = sampler_for(ways=8, augment=ROT90)  # alphabet sizes x4: 24, 12, 32, 20, 8
    assert sampler.num_classes == 4 * NUM_CLASSES
    assert sampler.alphabets == (10, 11, 12, 13, 14) and sampler.skipped_alphabets == ()
    examples, classes = sampler.draw(50, 0)
    assert torch.all(ALPHABETS[classes // 4] == ALPHABETS[classes[:, :1] // 4])
    drawers = sampler.example_drawers(examples)
    for t in range(50):
        assert not set(drawers[t, :, :2].flatten().tolist()) & set(
            drawers[t, :, 2:].flatten().tolist()
        )


def test_alphabets_smaller_than_ways_are_skipped_and_none_left_is_an_error():
    assert sampler_for(ways=6).alphabets == (10, 12)
    assert sampler_for(ways=8).alphabets == (12,)
    names = [f"A{i}" for i in range(15)]
    with pytest.raises(ValueError, match=r"ways=9 but no alphabet .*the largest, A12, has 8"):
        sampler_for(ways=9, alphabet_names=names)
    assert "2 smaller skipped" in repr(sampler_for())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(drawers=torch.arange(7)), ValueError, r"drawers must have one entry per example"),
        (dict(drawers=torch.zeros(20, 7)), TypeError, "drawers must be an integer tensor"),
        (dict(drawers=None), TypeError, r"drawers must be a torch.Tensor, got NoneType"),
        (dict(alphabets=ALPHABETS[:-1]), ValueError, r"alphabets must have one entry per class"),
        (dict(alphabets=ALPHABETS.float()), TypeError, "alphabets must be an integer tensor"),
        (dict(alphabet_names=["a"]), ValueError, "alphabet_names has 1 names"),
        (dict(support_drawers=1), ValueError, "support_drawers=1 is fewer than shots=2"),
        (dict(query_drawers=1), ValueError, "query_drawers=1 is fewer than queries=2"),
        (dict(support_drawers=6), ValueError, r"query_drawers=1 is fewer than queries=2"),
        (dict(support_drawers=4, query_drawers=4), ValueError, r"4 \+ 4 is more than the 7"),
        (dict(support_drawers=0), ValueError, "support_drawers must be >= 1"),
        (dict(query_drawers=2.0), TypeError, "query_drawers must be an int"),
        (dict(shots=4, queries=4), ValueError, "fewer than shots \\+ queries"),
    ],
)
def test_argument_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        sampler_for(**kwargs)


def test_every_class_needs_one_example_per_drawer():
    images, drawers = synthetic()
    twice = drawers.clone()
    twice[3, 0] = twice[3, 1]
    with pytest.raises(ValueError, match=r"class 3 has examples by drawers \[.*\], not one each"):
        WithinAlphabetSampler(
            images, alphabets=ALPHABETS, drawers=twice, ways=2, shots=1, queries=1
        )
    # Labelled form with one class missing a drawing.
    keep = torch.ones(NUM_CLASSES * NUM_DRAWERS, dtype=torch.bool)
    keep[5 * NUM_DRAWERS] = False
    labels = torch.arange(NUM_CLASSES).repeat_interleave(NUM_DRAWERS)
    with pytest.raises(ValueError, match="class 5 has 6 examples"):
        WithinAlphabetSampler(
            images.reshape(-1, 2)[keep],
            labels[keep],
            alphabets=ALPHABETS,
            drawers=drawers.reshape(-1)[keep],
            ways=2,
            shots=1,
            queries=1,
        )


def test_draw_in_and_fixed_set_checks():
    sampler = sampler_for()
    with pytest.raises(ValueError, match=r"alphabets \[11\] are not among"):
        sampler.draw_in(torch.tensor([10, 11]), 0)
    with pytest.raises(TypeError, match="sampler must be a WithinAlphabetSampler"):
        within_alphabet_tasks(FewShotSampler(torch.randn(4, 3, 2), ways=2, shots=1, queries=1))
    with pytest.raises(ValueError, match="tasks_per_alphabet must be >= 1"):
        within_alphabet_tasks(sampler, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        within_alphabet_tasks(sampler, 3, seed="0")
    with pytest.raises(TypeError, match="data must be an Omniglot"):
        WithinAlphabetSampler.from_omniglot(torch.randn(2), ways=2, shots=1, queries=1)
