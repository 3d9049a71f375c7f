"""The functional optimizers agree with torch.optim on the same gradients, and are pure."""

from __future__ import annotations

import math
import re

import pytest
import torch

import functional_meta as fm
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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: optim.adam(1e-3, eps=NAN), r"adam: eps: expected a finite number >= 0, got nan"),
        (lambda: optim.adam(1e-3, eps=INF), r"adam: eps: .* got inf"),
        (lambda: optim.adam(1e-3, eps=-1e-8), r"adam: eps: .* got -1e-08"),
        (lambda: optim.sgd(0.1, weight_decay=INF), r"sgd: weight_decay: .* got inf"),
        (lambda: optim.sgd(0.1, weight_decay=-0.1), r"sgd: weight_decay: .* got -0.1"),
        (lambda: optim.sgd(0.1, momentum=NAN), r"sgd: momentum: expected a finite number in \[0, 1\)"),
        (lambda: optim.sgd(0.1, momentum=-0.5), r"sgd: momentum: .* got -0.5"),
        (lambda: optim.sgd(0.1, momentum=1.5), r"sgd: momentum: .* got 1.5"),
        (lambda: optim.sgd(0.1, momentum=0.9, dampening=NAN), r"sgd: dampening: .*\[0, 1\]"),
        (lambda: optim.adam(1e-3, betas=(0.9, 1.0)), r"adam: betas\[1\]: .*\[0, 1\), got 1.0"),
        (lambda: optim.adam(1e-3, betas=(-0.1, 0.99)), r"adam: betas\[0\]: .* got -0.1"),
        (lambda: optim.adamw(1e-3, betas=(NAN, 0.99)), r"adamw: betas\[0\]: .* got nan"),
        (lambda: optim.adam(1e-3, betas=(0.9,)), r"adam: betas: expected a pair"),
        (lambda: optim.adamw(1e-3, weight_decay=1e300), r"adamw: lr \* weight_decay = 0.001 \* 1e\+300 must be below 1"),
        (lambda: optim.adamw(1e-3, weight_decay=NAN), r"adamw: weight_decay: .* got nan"),
        (lambda: optim.adamw(0.5, weight_decay=2.0), r"adamw: lr \* weight_decay .* must be below 1"),
        (lambda: optim.sgd(0.5, weight_decay=2.0), r"sgd: lr \* weight_decay .* must be below 1"),
        (lambda: optim.cosine_decay(0.1, 10, alpha=NAN), r"cosine_decay: alpha: .*\[0, 1\]"),
    ],
)  # fmt: skip
def test_bad_hyperparameters_are_rejected_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.adam(1e-3, eps="1e-8"),
        lambda: optim.sgd(0.1, momentum=True),
        lambda: optim.adam(1e-3, betas=0.9),
        lambda: optim.adamw(1e-3, weight_decay=None),
    ],
)
def test_hyperparameters_that_are_not_numbers_are_rejected(make):
    with pytest.raises(TypeError, match="expected"):
        make()


def test_edge_hyperparameters_are_accepted():
    optim.sgd(0.1, momentum=0.0, dampening=1.0, weight_decay=0.0)
    optim.adam(1e-3, betas=(0.0, 0.0), eps=0.0)
    optim.adamw(0.1, weight_decay=9.0)  # lr * weight_decay = 0.9: decays, does not flip sign


def step_until(opt, steps):
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update({"w": torch.ones(2)}, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("bad", [NAN, INF, -0.1, "0.1", None, torch.tensor(0.1)])
@pytest.mark.parametrize("make", [optim.sgd, optim.adam, optim.adamw])
def test_a_schedule_returning_a_bad_rate_fails_at_that_update(make, bad):
    opt = make(lambda step: 0.1 if step < 2 else bad)
    params, state = step_until(opt, 2)
    returned = re.escape(repr(bad))
    with pytest.raises(
        ValueError, match=rf"lr: the schedule returned {returned} at step 2; expect"
    ):
        opt.update({"w": torch.ones(2)}, state, params)
    assert all(torch.isfinite(p).all() for p in params.values())


def test_a_schedule_may_reach_zero_but_not_flip_the_decay():
    params, _ = step_until(optim.sgd(optim.cosine_decay(0.1, 2)), 5)  # 0.0 from step 2 on
    assert torch.isfinite(params["w"]).all()
    opt = optim.adamw(lambda step: 0.1 if step == 0 else 20.0, weight_decay=0.1)
    params, state = step_until(opt, 1)
    with pytest.raises(
        ValueError,
        match=r"adamw: the schedule returned lr 20 at step 1, .* = 2; it must be below 1",
    ):
        opt.update({"w": torch.ones(2)}, state, params)


def params_and_grads(shapes):
    params = {name: torch.zeros(shape) for name, shape in shapes.items()}
    return params, {name: torch.ones(shape) for name, shape in shapes.items()}


SHAPES = {"w": (4, 3), "b": (3,)}


@pytest.mark.parametrize(
    "make_state, use, message",
    [
        (lambda: optim.sgd(0.1).init, optim.adam(1e-3),
         r"adam: opt_state has keys \['count'\], expected \['count', 'mu', 'nu'\]"),
        (lambda: optim.adam(1e-3).init, optim.sgd(0.1, momentum=0.9),
         r"sgd: opt_state has keys \['count', 'mu', 'nu'\], expected \['count', 'momentum'\]"),
        (lambda: optim.sgd(0.1).init, optim.sgd(0.1, momentum=0.9),
         r"sgd: opt_state has keys \['count'\], expected \['count', 'momentum'\]"),
        (lambda: optim.adam(1e-3).init, optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-3)),
         r"chain: opt_state has keys \['count', 'mu', 'nu'\], expected \['0', '1'\]"),
        (lambda: optim.chain(optim.adam(1e-3)).init, optim.clip_by_global_norm(1.0),
         r"clip_by_global_norm: opt_state: expected \{\} .* got keys \['0'\]"),
    ],
)  # fmt: skip
def test_state_from_another_optimizer_is_rejected(make_state, use, message):
    params, grads = params_and_grads(SHAPES)
    state = make_state()(params)
    with pytest.raises(ValueError, match=message):
        use.update(grads, state, params)


@pytest.mark.parametrize("make", [lambda: optim.adam(1e-3), lambda: optim.sgd(0.1, momentum=0.9)])
def test_state_for_other_parameters_is_rejected(make):
    opt = make()
    moment = "mu" if "mu" in opt.init({}) else "momentum"
    params, grads = params_and_grads(SHAPES)
    state = opt.init(params)
    _, state = opt.update(grads, state, params)  # count 1: sgd reads its buffer from now on
    other, other_grads = params_and_grads({"w": (3,), "b": (3,)})
    with pytest.raises(
        ValueError,
        match=rf"opt_state\['{moment}'\]\['w'\] has shape \(4, 3\); the gradient's is \(3,\)",
    ):
        opt.update(other_grads, state, other)
    renamed, renamed_grads = params_and_grads({"weight": (4, 3), "b": (3,)})
    with pytest.raises(
        ValueError,
        match=rf"opt_state\['{moment}'\] does not have the gradients' structure: it lacks \['weight'\] and has extra \['w'\]",
    ):
        opt.update(renamed_grads, state, renamed)
    zero_d = dict(
        state, **{moment: {name: torch.tensor(0.0) for name in SHAPES}}
    )  # would broadcast
    with pytest.raises(
        ValueError,
        match=rf"opt_state\['{moment}'\]\['b'\] has shape \(\); the gradient's is \(3,\)",
    ):
        opt.update(grads, zero_d, params)
    floats = dict(state, **{moment: {name: 0.0 for name in SHAPES}})
    with pytest.raises(
        TypeError, match=rf"opt_state\['{moment}'\]\['b'\]: expected a tensor, got float"
    ):
        opt.update(grads, floats, params)
    with pytest.raises(ValueError, match=r"opt_state\['count'\]: expected a 0-d integer tensor"):
        opt.update(grads, dict(state, count=torch.zeros(2, dtype=torch.long)), params)
    with pytest.raises(
        TypeError, match=r"opt_state: expected the dict made by .*init, got NoneType"
    ):
        opt.update(grads, None, params)


# -- other libraries' transformations ------------------------------------------------------
class KeywordOnlySGD:
    """An optax-shaped transformation whose update takes params by keyword only, as
    TorchOpt's does."""

    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return ()

    def update(self, updates, state, *, params=None):
        return {k: -self.lr * g for k, g in updates.items()}, state


def _maml_problem():
    import torch.nn.functional as F

    from tests.reference import regression_tasks, tiny_mlp

    apply, params, buffers = fm.functionalize(tiny_mlp())
    options = dict(apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(lr=0.05))
    return params, regression_tasks(), options


def test_any_optax_shaped_transformation_drives_the_steps():
    params, tasks, options = _maml_problem()
    theirs, _, _ = fm.maml_step(params, (), tasks, optimizer=KeywordOnlySGD(0.1), **options)
    sgd = fm.optim.sgd(0.1)
    ours, _, _ = fm.maml_step(params, sgd.init(params), tasks, optimizer=sgd, **options)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name])


def test_torchopt_adam_equals_ours_through_maml_step():
    torchopt = pytest.importorskip("torchopt")
    params, tasks, options = _maml_problem()
    theirs_tx, ours_tx = torchopt.adam(1e-2), fm.optim.adam(1e-2)
    theirs, ours = dict(params), dict(params)
    theirs_state, ours_state = theirs_tx.init(theirs), ours_tx.init(ours)
    for _ in range(3):
        theirs, theirs_state, _ = fm.maml_step(
            theirs, theirs_state, tasks, optimizer=theirs_tx, **options
        )
        ours, ours_state, _ = fm.maml_step(ours, ours_state, tasks, optimizer=ours_tx, **options)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)


def test_a_torch_optim_optimizer_is_refused_with_the_way_to_use_it():
    params, tasks, options = _maml_problem()
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(TypeError, match="torch.optim optimizer.*assign_grads"):
        fm.maml_step(params, {}, tasks, optimizer=adam, **options)
    with pytest.raises(TypeError, match="expected a gradient transformation with init"):
        fm.maml_step(params, {}, tasks, optimizer="adam", **options)
