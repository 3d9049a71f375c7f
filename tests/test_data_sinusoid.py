"""Sinusoid tasks: parameter ranges, the function itself, shapes, reproducibility, checks."""

import math

import pytest
import torch

from functional_meta.data import SinusoidTasks, TaskBatch, sample_sinusoids, sinusoid_tasks


def test_shapes_and_dtypes():
    batch = sinusoid_tasks(7, support=5, query=11, generator=0)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == batch.support_y.shape == (7, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (7, 11, 1)
    assert all(t.dtype == torch.float32 for t in batch.tensors())
    assert not batch.is_classification


def test_parameter_ranges_and_the_function():
    drawn = sample_sinusoids(2000, 10, 10, generator=torch.Generator().manual_seed(1))
    assert isinstance(drawn, SinusoidTasks)
    a, phi, tasks = drawn.amplitude, drawn.phase, drawn.tasks
    assert a.shape == phi.shape == (2000,)
    assert a.min() >= 0.1 and a.max() <= 5.0
    assert phi.min() >= 0.0 and phi.max() <= math.pi
    for x in (tasks.support_x, tasks.query_x):
        assert x.min() >= -5.0 and x.max() <= 5.0
    # The draws fill their ranges (uniform, not a constant or a narrow band).
    assert a.min() < 0.2 and a.max() > 4.9 and phi.min() < 0.05 and phi.max() > math.pi - 0.05
    assert abs(float(a.mean()) - 2.55) < 0.15
    assert tasks.support_x.min() < -4.99 and tasks.support_x.max() > 4.99
    for x, y in ((tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y)):
        expected = a[:, None, None] * torch.sin(x - phi[:, None, None])
        torch.testing.assert_close(y, expected)
    # The callable evaluates the true curves, on shared or per-task points.
    grid = torch.linspace(-5, 5, 50)
    torch.testing.assert_close(drawn(grid), a[:, None] * torch.sin(grid[None] - phi[:, None]))
    torch.testing.assert_close(drawn(tasks.query_x), tasks.query_y)


def test_same_seed_same_tasks_different_seed_different_tasks():
    a = sinusoid_tasks(4, generator=torch.Generator().manual_seed(5))
    b = sinusoid_tasks(4, generator=5)
    c = sinusoid_tasks(4, generator=6)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)
    g = torch.Generator().manual_seed(5)
    first, second = sinusoid_tasks(4, generator=g), sinusoid_tasks(4, generator=g)
    assert not torch.equal(first.support_x, second.support_x)  # the generator advances


def test_custom_ranges_and_dtype():
    drawn = sample_sinusoids(
        50,
        3,
        3,
        generator=0,
        amplitude=(1.0, 1.0),
        phase=(0.0, 0.0),
        input_range=(0, 1),
        dtype=torch.float64,
    )
    assert drawn.tasks.support_x.dtype == torch.float64
    assert torch.all(drawn.amplitude == 1.0) and torch.all(drawn.phase == 0.0)
    torch.testing.assert_close(drawn.tasks.support_y, torch.sin(drawn.tasks.support_x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_tasks=0), ValueError, "num_tasks must be >= 1"),
        (dict(support=0), ValueError, "support must be >= 1"),
        (dict(query=-1), ValueError, "query must be >= 1"),
        (dict(num_tasks=2.0), TypeError, "num_tasks must be an int"),
        (dict(generator=None), TypeError, "generator must be a torch.Generator or an int seed"),
        (dict(amplitude=(5.0, 0.1)), ValueError, "amplitude must have low <= high"),
        (dict(phase=3.0), TypeError, "phase must be a pair"),
        (dict(dtype=torch.long), TypeError, "dtype must be a floating"),
    ],
)
def test_input_checks(kwargs, error, match):
    args = dict(num_tasks=2, support=3, query=3, generator=0) | kwargs
    with pytest.raises(error, match=match):
        sample_sinusoids(**args)
