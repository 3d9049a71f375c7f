"""The functional optimizers agree with torch.optim on the same gradients, and are pure."""

from __future__ import annotations

import math

import pytest
import torch

from functional_meta import optim


def run_both(functional, make_torch, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads_seq = [
        {k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)
    ]
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = make_torch(list(torch_params.values()))
    state = functional.init(params)
    for grads in grads_seq:
        snapshot = (
            {k: v.clone() for k, v in params.items()},
            {k: v.clone() for k, v in grads.items()},
        )
        updates, state = functional.update(grads, state, params)
        assert all(torch.equal(params[k], snapshot[0][k]) for k in params), "params were modified"
        assert all(torch.equal(grads[k], snapshot[1][k]) for k in grads), "grads were modified"
        params = optim.apply_updates(params, updates)
        optim.assign_grads(torch_params, grads)
        torch_opt.step()
    for k in params:
        torch.testing.assert_close(params[k], torch_params[k].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "functional, make_torch",
    [
        (optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (optim.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        (
            optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        (optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        (
            optim.adam(1e-2, betas=(0.8, 0.99), weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
        ),
        (
            optim.adamw(1e-2, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        ),
    ],
    ids=["sgd", "momentum", "nesterov-wd", "adam", "adam-l2", "adamw"],
)
def test_matches_torch_optim(functional, make_torch):
    run_both(functional, make_torch)


def test_cosine_schedule_matches_torch_cosine_annealing():
    params = {"w": torch.zeros(2)}
    torch_param = torch.nn.Parameter(torch.zeros(2))
    torch_opt = torch.optim.SGD([torch_param], lr=0.5)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=10, eta_min=0.05)
    schedule = optim.cosine_decay(0.5, 10, alpha=0.1)
    for step in range(11):
        assert math.isclose(
            schedule(step), torch_opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12
        )
        torch_opt.step()
        torch_sched.step()
    assert schedule(0) == 0.5 and math.isclose(schedule(100), 0.05)
    functional = optim.sgd(optim.cosine_decay(0.5, 10))
    state = functional.init(params)
    updates, state = functional.update({"w": torch.ones(2)}, state, params)
    assert torch.allclose(updates["w"], torch.full((2,), -0.5))


def test_clip_by_global_norm_matches_clip_grad_norm():
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}
    clipped, _ = optim.clip_by_global_norm(6.5).update(grads, {}, grads)
    reference = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    reference[0].grad, reference[1].grad = grads["a"].clone(), grads["b"].clone()
    torch.nn.utils.clip_grad_norm_(reference, 6.5)
    torch.testing.assert_close(clipped["a"], reference[0].grad)
    torch.testing.assert_close(clipped["b"], reference[1].grad)
    untouched, _ = optim.clip_by_global_norm(100.0).update(grads, {}, grads)
    torch.testing.assert_close(untouched["a"], grads["a"])


def test_chain_clips_then_steps():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(1.0))
    params = {"w": torch.zeros(2)}
    updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init(params), params)
    torch.testing.assert_close(updates["w"], torch.tensor([-0.6, -0.8]), rtol=1e-5, atol=1e-6)
    assert int(state["1"]["count"]) == 1


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_learning_rates_are_rejected(lr):
    for make in (optim.sgd, optim.adam, optim.adamw):
        with pytest.raises(ValueError, match="lr: expected a positive finite number"):
            make(lr)
