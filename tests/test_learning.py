"""A real learning check: every algorithm meta-trains on the MAML paper's sinusoid task
(K=10) and ends with a lower post-adaptation MSE than the same network not meta-trained,
by a margin, on fixed seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.data import sinusoid_tasks

SETTINGS = {
    "maml": dict(inner_steps=1),
    "fomaml": dict(inner_steps=1),
    "anil": dict(inner_steps=1),
    "metasgd": dict(inner_steps=1),
    "mamlpp": dict(inner_steps=2),
    "reptile": dict(inner_steps=5),
}


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_meta_training_lowers_the_post_adaptation_mse(algorithm):
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 1)))
    settings = SETTINGS[algorithm]
    record = fm.algorithms.build(
        algorithm, apply, F.mse_loss, fm.InnerLoop(lr=0.01, steps=settings["inner_steps"])
    )
    optimizer = fm.optim.adam(3e-3)
    state = fm.init_state(record, params, buffers, optimizer)
    test_tasks = sinusoid_tasks(200, generator=123)

    def post_adaptation_mse(state):
        return fm.evaluate(record, state, test_tasks).loss

    before = post_adaptation_mse(state)
    generator = torch.Generator().manual_seed(1)
    for step in range(250):
        tasks = sinusoid_tasks(10, generator=generator)
        state, _ = fm.step(record, state, tasks, optimizer, epoch=step / 50, generator=generator)
    after = post_adaptation_mse(state)
    assert after < 0.75 * before, f"{algorithm}: post-adaptation MSE {before:.3f} -> {after:.3f}"
