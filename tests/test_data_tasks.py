"""TaskBatch / Task: construction checks, indexing, .to, from_tasks, vmap over tasks."""

import pytest
import torch

from functional_meta.data import Task, TaskBatch
from functional_meta.data.tasks import _as_generator, _check_count


def make(t=3, s=4, q=5, feature=(2,), y_dtype=torch.long):
    if y_dtype.is_floating_point:
        sy, qy = torch.randn(t, s), torch.randn(t, q)
    else:
        sy, qy = (
            torch.randint(0, 3, (t, s), dtype=y_dtype),
            torch.randint(0, 3, (t, q), dtype=y_dtype),
        )
    return TaskBatch(torch.randn(t, s, *feature), sy, torch.randn(t, q, *feature), qy)


def test_well_formed_batch_properties():
    batch = make()
    assert batch.num_tasks == len(batch) == 3
    assert batch.is_classification
    assert not make(y_dtype=torch.float32).is_classification
    assert [tuple(t.shape) for t in batch.tensors()] == [(3, 4, 2), (3, 4), (3, 5, 2), (3, 5)]


def test_regression_targets_with_trailing_axis_are_accepted():
    batch = TaskBatch(
        torch.randn(2, 4, 1), torch.randn(2, 4, 1), torch.randn(2, 6, 1), torch.randn(2, 6, 1)
    )
    assert batch.support_y.shape == (2, 4, 1)


def test_indexing_gives_one_task_or_a_smaller_batch():
    batch = make()
    task = batch[1]
    assert isinstance(task, Task)
    assert torch.equal(task.support_x, batch.support_x[1])
    assert torch.equal(task.query_y, batch.query_y[1])
    assert torch.equal(batch[-1].query_x, batch.query_x[2])
    sub = batch[1:3]
    assert isinstance(sub, TaskBatch) and sub.num_tasks == 2
    assert torch.equal(sub.support_y, batch.support_y[1:3])


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(support_x=1.0), "support_x: expected a torch.Tensor"),
        (dict(support_x=[1.0]), r"support_x\[0\]: expected a torch.Tensor"),
        (dict(support_x=()), "support_x: expected a tensor or a tuple/dict of tensors"),
        (
            dict(support_x=(torch.randn(3, 4, 2), torch.ones(3, 5))),
            r"support_x\[1\]: expected the task and example axes \(3, 4\) of TaskBatch.support_x\[0\]",
        ),
        (
            dict(support_x=(torch.randn(3, 4, 2),)),
            "support_x and query_x must have the same structure",
        ),
        (dict(support_x=torch.randn(3)), r"support_x: expected shape \[T, N, \*features\]"),
        (dict(query_y=torch.zeros(2, 5, dtype=torch.long)), "leading task axis T must agree"),
        (
            dict(support_x=torch.randn(3, 0, 2), support_y=torch.zeros(3, 0, dtype=torch.long)),
            "S=0",
        ),
        (dict(query_x=torch.randn(3, 0, 2), query_y=torch.zeros(3, 0, dtype=torch.long)), "Q=0"),
        (dict(query_x=torch.randn(3, 5, 7)), "same shape"),
        (
            dict(support_y=torch.zeros(3, 3, dtype=torch.long)),
            r"support_y: expected shape \[T, N\]",
        ),
        (dict(query_y=torch.zeros(3, 5, 2, dtype=torch.long)), r"class labels must be \[T, N\]"),
        (dict(support_y=-torch.ones(3, 4, dtype=torch.long)), "labels must be >= 0"),
        (dict(support_y=torch.zeros(3, 4, dtype=torch.bool)), "expected integer class labels"),
        (dict(support_y=torch.zeros(3, 4)), "both must be class labels or both regression"),
        (dict(query_x=torch.randn(3, 5, 2, dtype=torch.float64)), "support_x is torch.float32"),
        (dict(support_y=torch.zeros(3, 4, 1), query_y=torch.zeros(3, 5, 2)), "same trailing shape"),
        (dict(query_x=torch.randn(3, 5, 2, device="meta")), "one device"),
    ],
)
def test_malformed_batches_raise_naming_the_field(fields, match):
    tensors = dict(
        zip(("support_x", "support_y", "query_x", "query_y"), make().tensors(), strict=True)
    )
    tensors.update(fields)
    with pytest.raises((ValueError, TypeError), match=match):
        TaskBatch(**tensors)


def test_to_casts_inputs_but_keeps_class_labels():
    batch = make()
    for moved in (
        batch.to(torch.float64),
        batch.to(dtype=torch.float64),
        batch.to("cpu", torch.float64),
    ):
        assert moved.support_x.dtype == moved.query_x.dtype == torch.float64
        assert moved.support_y.dtype == moved.query_y.dtype == torch.long
    moved = batch.to(torch.zeros(1, dtype=torch.float64))  # Tensor.to(other): labels only move
    assert moved.support_x.dtype == torch.float64 and moved.query_y.dtype == torch.long
    regression = make(y_dtype=torch.float32).to(torch.float64)
    assert regression.support_y.dtype == torch.float64


def test_from_tasks_accepts_pairs_and_tasks_and_reports_bad_input():
    batch = make()
    pairs = [
        ((t.support_x, t.support_y), (t.query_x, t.query_y)) for t in (batch[0], batch[1], batch[2])
    ]
    rebuilt = TaskBatch.from_tasks(pairs)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.tensors(), batch.tensors(), strict=True))
    assert TaskBatch.from_tasks([batch[0], batch[1]]).num_tasks == 2
    with pytest.raises(ValueError, match="at least one task"):
        TaskBatch.from_tasks([])
    with pytest.raises(ValueError, match="task 1 must be"):
        TaskBatch.from_tasks([pairs[0], (1, 2, 3)])
    other = make(s=2)
    with pytest.raises(ValueError, match="different shapes"):
        TaskBatch.from_tasks([batch[0], other[0]])


def test_vmap_maps_over_the_task_axis():
    batch = make(t=4)

    def per_task(task: Task) -> torch.Tensor:
        return task.support_x.sum() + task.query_x.sum()

    out = torch.func.vmap(lambda *ts: per_task(Task(*ts)))(*batch.tensors())
    expected = torch.stack([per_task(batch[i]) for i in range(4)])
    torch.testing.assert_close(out, expected)


def test_generator_and_count_helpers():
    assert _as_generator(3, "f").initial_seed() == 3
    g = torch.Generator()
    assert _as_generator(g, "f") is g
    for bad in (None, 1.5, True):
        with pytest.raises(TypeError, match="f: generator must be"):
            _as_generator(bad, "f")
    assert _check_count(2, "ways", "f") == 2
    with pytest.raises(ValueError, match="f: ways must be >= 1, got 0"):
        _check_count(0, "ways", "f")
    with pytest.raises(TypeError, match="f: ways must be an int"):
        _check_count(2.0, "ways", "f")


def test_batches_compare_by_identity():
    tensors = [torch.zeros(2, 3, 1) for _ in range(4)]
    a, b = TaskBatch(*tensors), TaskBatch(*tensors)
    assert a == a and a != b and len({a, b}) == 2


def two_inputs(t=3, s=4, q=5):
    """Tasks for a model ``forward(x, mask)``: inputs a tuple and a dict of two tensors."""
    sx, qx = (
        (torch.randn(t, s, 6, 2), torch.ones(t, s, 6)),
        (torch.randn(t, q, 6, 2), torch.ones(t, q, 6)),
    )
    return sx, torch.randn(t, s), qx, torch.randn(t, q)


def test_inputs_may_be_a_tuple_or_a_dict_of_tensors_sharing_the_task_and_example_axes():
    sx, sy, qx, qy = two_inputs()
    batch = TaskBatch(sx, sy, qx, qy)
    assert batch.num_tasks == 3 and batch.device == torch.device("cpu")
    task = batch[1]
    assert isinstance(task.support_x, tuple) and torch.equal(task.support_x[1], sx[1][1])
    assert batch[1:3].query_x[0].shape == (2, 5, 6, 2)
    moved = batch.to(torch.float64)
    assert moved.support_x[0].dtype == torch.float64 and moved.support_y.dtype == torch.float64
    as_dict = TaskBatch(dict(x=sx[0], mask=sx[1]), sy, dict(x=qx[0], mask=qx[1]), qy)
    assert torch.equal(as_dict[0].query_x["mask"], qx[1][0])
    stacked = TaskBatch.from_tasks([batch[0], batch[2]])
    assert torch.equal(stacked.support_x[0][1], sx[0][2])
    with pytest.raises(ValueError, match=r"query_x\['x'\]: expected the task and example"):
        TaskBatch(dict(x=sx[0], mask=sx[1]), sy, dict(x=qx[0][:, :2], mask=qx[1]), qy)
    with pytest.raises(
        TypeError,
        match=r"TaskBatch: support_x\[1\] is torch.float32 but query_x\[1\] is torch.int64",
    ):
        TaskBatch(sx, sy, (qx[0], qx[1].long()), qy)
