"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

Each task is ``y = A · sin(x − φ)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``φ ~ U[0, π]`` and inputs ``x ~ U[-5, 5]``. A whole meta-batch is drawn as a few tensor
operations from one ``torch.Generator``: same seed, same tasks.

Shapes: inputs and targets carry a trailing feature axis of size 1, so that they match a
``1 -> 1`` MLP's input and output exactly (``F.mse_loss(model(x), y)`` never broadcasts)::

    support_x [T, S, 1]   support_y [T, S, 1]
    query_x   [T, Q, 1]   query_y   [T, Q, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from functional_meta.data.tasks import TaskBatch, _as_generator, _check_count

__all__ = ["SinusoidTasks", "sample_sinusoids", "sinusoid_tasks"]

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


@dataclass(frozen=True)
class SinusoidTasks:
    """A sinusoid meta-batch together with the parameters that generated it.

    ``tasks`` is the :class:`TaskBatch`; ``amplitude [T]`` and ``phase [T]`` are the per-task
    ``A`` and ``φ`` (for plotting the true curves or checking a fit).
    """

    tasks: TaskBatch
    amplitude: torch.Tensor
    phase: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The true functions at ``x``: ``x [T, P, ...]`` (or ``[P]``, shared) -> ``A·sin(x − φ)``.

        ``x [P]`` evaluates every task on the same points and returns ``[T, P]``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SinusoidTasks: x must be a torch.Tensor, got {type(x).__name__}")
        amplitude, phase = self.amplitude, self.phase
        if x.dim() == 1:
            x = x.unsqueeze(0)
        elif x.dim() == 0 or x.shape[0] != amplitude.shape[0]:
            raise ValueError(
                f"SinusoidTasks: x must be [P] or [T={amplitude.shape[0]}, P, ...], got {tuple(x.shape)}"
            )
        view = (-1,) + (1,) * (x.dim() - 1)
        return amplitude.view(view) * torch.sin(x - phase.view(view))


def _check_range(value: object, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"sample_sinusoids: {name} must be a pair (low, high), got {value!r}"
        ) from error
    if not low <= high:
        raise ValueError(f"sample_sinusoids: {name} must have low <= high, got {value!r}")
    return low, high


def sample_sinusoids(
    num_tasks: int,
    support: int = 10,
    query: int = 10,
    *,
    generator: torch.Generator | int,
    amplitude: tuple[float, float] = AMPLITUDE,
    phase: tuple[float, float] = PHASE,
    input_range: tuple[float, float] = INPUT_RANGE,
    dtype: torch.dtype = torch.float32,
) -> SinusoidTasks:
    """Draw ``num_tasks`` sinusoid tasks and return them with their amplitudes and phases.

    Args:
        num_tasks: ``T``, the number of tasks (>= 1).
        support: ``S``, support points per task (>= 1; ``K`` in the paper).
        query: ``Q``, query points per task (>= 1).
        generator: a ``torch.Generator`` (its device is where the tensors are made) or an
            int seed. All randomness comes from it, in a fixed order: amplitudes, phases,
            support inputs, query inputs.
        amplitude, phase, input_range: the ``(low, high)`` of the uniform distributions.
        dtype: floating dtype of inputs and targets.

    Returns:
        :class:`SinusoidTasks` with ``tasks`` (``support_x/support_y [T, S, 1]``,
        ``query_x/query_y [T, Q, 1]``), ``amplitude [T]`` and ``phase [T]``.
    """
    where = "sample_sinusoids"
    num_tasks = _check_count(num_tasks, "num_tasks", where)
    support = _check_count(support, "support", where)
    query = _check_count(query, "query", where)
    generator = _as_generator(generator, where)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    ranges = {
        name: _check_range(value, name)
        for name, value in (
            ("amplitude", amplitude),
            ("phase", phase),
            ("input_range", input_range),
        )
    }

    def uniform(shape: tuple[int, ...], name: str) -> torch.Tensor:
        low, high = ranges[name]
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
        return low + (high - low) * u

    amp = uniform((num_tasks,), "amplitude")
    phi = uniform((num_tasks,), "phase")
    support_x = uniform((num_tasks, support, 1), "input_range")
    query_x = uniform((num_tasks, query, 1), "input_range")
    amp_v, phi_v = amp.view(-1, 1, 1), phi.view(-1, 1, 1)
    tasks = TaskBatch(
        support_x,
        amp_v * torch.sin(support_x - phi_v),
        query_x,
        amp_v * torch.sin(query_x - phi_v),
    )
    return SinusoidTasks(tasks, amp, phi)


def sinusoid_tasks(
    num_tasks: int,
    support: int = 10,
    query: int = 10,
    *,
    generator: torch.Generator | int,
) -> TaskBatch:
    """A meta-batch of ``num_tasks`` sinusoid tasks (Finn et al. 2017 ranges).

    Shapes: ``support_x, support_y [T, S, 1]``; ``query_x, query_y [T, Q, 1]``; float32.
    Same as ``sample_sinusoids(...).tasks``; use :func:`sample_sinusoids` to also get the
    amplitudes and phases.
    """
    return sample_sinusoids(num_tasks, support, query, generator=generator).tasks
