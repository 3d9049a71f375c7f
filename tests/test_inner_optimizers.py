"""Differentiable inner optimizers: MAML through inner SGD-momentum and Adam against a
hand-written torch.autograd reference (first and second order, every batching strategy),
inner SGD through the optimizer path equal to the plain inner loop, Adam's square root at
zero, and the errors for what cannot be an inner optimizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import functional_meta as fm
from functional_meta import InnerLoop, optim
from functional_meta.cli import main
from tests.reference import regression_tasks, tiny_mlp

STRATEGIES = [fm.Batching("vmap"), fm.Batching("vmap", chunk_size=3), fm.Batching("loop"),
              fm.Batching("auto")]  # fmt: skip
LR, MOMENTUM, BETAS, EPS = 0.05, 0.9, (0.8, 0.95), 1e-8


def _sqrt(v):
    """The reference's √v: torch.sqrt where v > 0, derivative 0 where v = 0 (as documented)."""
    return torch.where(v > 0, torch.sqrt(torch.where(v > 0, v, 1.0)), 0.0)


def momentum_step(state, g, t):
    """Hand-written SGD with momentum μ (torch.optim.SGD's buffer: b = g at the first step)."""
    b = g if t == 0 else MOMENTUM * state + g
    return -LR * b, b


def adam_step(state, g, t, sqrt=_sqrt):
    """Hand-written Adam (Kingma and Ba 2015, torch.optim.Adam's form), step t + 1."""
    m, v = state if state is not None else (torch.zeros_like(g), torch.zeros_like(g))
    (b1, b2), n = BETAS, t + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denominator = sqrt(v) / math.sqrt(1 - b2**n) + EPS
    return -(LR / (1 - b1**n)) * m / denominator, (m, v)


HAND = {"momentum": momentum_step, "adam": adam_step}
LIBRARY = {
    "momentum": optim.sgd(LR, momentum=MOMENTUM),
    "adam": optim.adam(LR, betas=BETAS, eps=EPS),
}


def reference_grad(module, params, tasks, step, steps, first_order, loss=F.mse_loss):
    """``∇_θ (1/T) Σ_i L_query,i(θ'_i)`` with ``θ'`` from ``steps`` hand-written optimizer
    steps, by torch.autograd over plain tensors, one task at a time."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for i in range(len(tasks)):
        fast, states = dict(leaves), dict.fromkeys(leaves)
        for t in range(steps):
            support = loss(functional_call(module, fast, (tasks.support_x[i],)), tasks.support_y[i])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order)
            new = {}
            for (name, value), g in zip(fast.items(), grads, strict=True):
                update, states[name] = step(states[name], g, t)
                new[name] = value + update
            fast = new
        total = total + loss(functional_call(module, fast, (tasks.query_x[i],)), tasks.query_y[i])
    grads = torch.autograd.grad(total / len(tasks), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def meta_grad(inner, params, tasks, batching=fm.Batching("vmap"), algorithm=fm.algorithms.maml):
    apply, _, buffers = fm.functionalize(tiny_mlp(torch.float64))
    record = algorithm(apply, F.mse_loss, inner, batching=batching)
    meta, buffers = record.init(params, buffers)
    return record.grad(meta, buffers, tasks).grads["params"]


@pytest.fixture(scope="module")
def problem():
    module = tiny_mlp(torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    return module, params, regression_tasks(num_tasks=5, dtype=torch.float64)


@pytest.mark.parametrize("batching", STRATEGIES, ids=lambda b: f"{b.strategy}-{b.chunk_size}")
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_maml_through_an_inner_optimizer_matches_the_autograd_reference(
    problem, name, first_order, batching
):
    module, params, tasks = problem
    expected = reference_grad(module, params, tasks, HAND[name], 3, first_order)
    inner = InnerLoop(steps=3, first_order=first_order, optimizer=LIBRARY[name])
    found = meta_grad(inner, params, tasks, batching)
    for key in params:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-6, atol=1e-9)


def test_second_order_flows_through_the_optimizer_state(problem):
    _, params, tasks = problem
    for name in ("momentum", "adam"):
        inner = InnerLoop(steps=3, optimizer=LIBRARY[name])
        second = meta_grad(inner, params, tasks)
        first = meta_grad(InnerLoop(steps=3, first_order=True, optimizer=LIBRARY[name]), params,
                          tasks)  # fmt: skip
        assert max((second[k] - first[k]).abs().max() for k in params) > 1e-4


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("algorithm", ["maml", "anil", "reptile"])
def test_inner_sgd_through_the_optimizer_path_equals_the_plain_inner_loop_exactly(
    problem, algorithm, strategy, first_order
):
    _, params, tasks = problem
    build = fm.algorithms.REGISTRY[algorithm]
    plain = InnerLoop(lr=LR, steps=3, first_order=first_order)
    through = InnerLoop(steps=3, first_order=first_order, optimizer=optim.sgd(LR))
    expected = meta_grad(plain, params, tasks, fm.Batching(strategy), build)
    found = meta_grad(through, params, tasks, fm.Batching(strategy), build)
    assert all(torch.equal(found[k], expected[k]) for k in params)


def test_evaluation_adapts_with_the_inner_optimizer(problem):
    module, params, tasks = problem
    apply, _, buffers = fm.functionalize(module)
    inner = InnerLoop(steps=2, optimizer=LIBRARY["adam"])
    record = fm.algorithms.maml(apply, F.mse_loss, inner)
    meta, buffers = record.init(params, buffers)
    adapted = record.adapt(meta, buffers, tasks.support_x[0], tasks.support_y[0], 4).params
    fast = {k: v.clone().requires_grad_() for k, v in params.items()}
    state = dict.fromkeys(params)
    for t in range(4):
        support = F.mse_loss(functional_call(module, fast, (tasks.support_x[0],)),
                             tasks.support_y[0])  # fmt: skip
        grads = torch.autograd.grad(support, list(fast.values()))
        for (key, value), g in zip(list(fast.items()), grads, strict=True):
            update, state[key] = adam_step(state[key], g, t)
            fast[key] = (value + update).detach().requires_grad_()
    for key in params:
        torch.testing.assert_close(adapted[key], fast[key].detach(), rtol=1e-10, atol=1e-12)


def test_adam_second_order_is_finite_where_a_gradient_entry_is_exactly_zero():
    # A linear model whose second input is 0 on every support point: the inner gradient of
    # that weight is exactly 0 at every step, so Adam's v is 0 there. d√v/dv = ∞ there, and
    # the zero that reaches it makes a naive second-order meta-gradient NaN.
    module = torch.nn.Linear(2, 1).double()
    params = {k: v.detach() for k, v in module.named_parameters()}
    g = torch.Generator().manual_seed(0)
    support_x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    support_x[..., 1] = 0.0
    query_x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    tasks = fm.TaskBatch(support_x, torch.randn(3, 4, 1, generator=g, dtype=torch.float64),
                         query_x, torch.randn(3, 4, 1, generator=g, dtype=torch.float64))  # fmt: skip
    naive = reference_grad(module, params, tasks, lambda s, g_, t: adam_step(s, g_, t, torch.sqrt),
                           2, first_order=False)  # fmt: skip
    assert torch.isnan(naive["weight"]).any()  # the hazard is real
    expected = reference_grad(module, params, tasks, adam_step, 2, first_order=False)
    apply, _, buffers = fm.functionalize(module)
    for strategy in ("vmap", "loop"):
        record = fm.algorithms.maml(apply, F.mse_loss, InnerLoop(steps=2, optimizer=LIBRARY["adam"]),
                                    batching=fm.Batching(strategy))  # fmt: skip
        meta, _ = record.init(params, buffers)
        found = record.grad(meta, buffers, tasks).grads["params"]
        for key in params:
            assert torch.isfinite(found[key]).all()
            torch.testing.assert_close(found[key], expected[key], rtol=1e-6, atol=1e-9)


def test_adam_values_are_the_same_with_and_without_a_graph():
    # The unfused, differentiable path (any tensor tracked) and the fused one agree exactly,
    # zero gradient entries and weight decay included.
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    grads["w"][0] = 0.0
    for opt in (optim.adam(1e-2), optim.adamw(1e-2), optim.adam(1e-2, weight_decay=0.1)):
        state_a, state_b = opt.init(params), opt.init(params)
        for _ in range(3):
            tracked = {k: v.clone().requires_grad_() for k, v in grads.items()}
            fused, state_a = opt.update(grads, state_a, params=params)
            unfused, state_b = opt.update(tracked, state_b, params=params)
            for key in params:
                assert torch.equal(fused[key], unfused[key].detach())
            first = torch.autograd.grad(sum(u.sum() for u in unfused.values()),
                                        list(tracked.values()))  # fmt: skip
            assert all(torch.isfinite(d).all() for d in first)
            state_b = {k: v if k == "count" else {n: t.detach() for n, t in v.items()}
                       for k, v in state_b.items()}  # fmt: skip


@pytest.mark.parametrize(
    "optimizer, error, match",
    [
        ("adam", TypeError, "InnerLoop.optimizer: expected a gradient transformation"),
        (optim.adam, TypeError, "InnerLoop.optimizer: .*call it to build"),
        (torch.optim.Adam([torch.zeros(1, requires_grad=True)]), TypeError,
         "InnerLoop.optimizer: Adam is a torch.optim optimizer.*optim.adam"),
        (torch.optim.SGD, TypeError, "InnerLoop.optimizer: SGD is a torch.optim optimizer"),
    ],
    ids=["string", "uncalled-factory", "torch-optim", "torch-optim-class"],
)  # fmt: skip
def test_what_is_not_a_functional_transformation_is_refused(optimizer, error, match):
    with pytest.raises(error, match=match):
        InnerLoop(optimizer=optimizer)


def test_an_optimizer_and_a_plain_rate_or_learned_rates_do_not_combine(problem):
    with pytest.raises(ValueError, match="InnerLoop.lr: the inner optimizer has its own"):
        InnerLoop(lr=0.1, optimizer=optim.adam(1e-2))
    assert InnerLoop().lr == 0.01 and InnerLoop(optimizer=optim.adam(1e-2)).lr is None
    module, params, tasks = problem
    apply, _, buffers = fm.functionalize(module)
    inner = InnerLoop(steps=2, optimizer=optim.adam(1e-2))
    with pytest.raises(ValueError, match="metasgd: InnerLoop.optimizer: meta-learned"):
        fm.algorithms.metasgd(apply, F.mse_loss, inner)
    with pytest.raises(ValueError, match=r"mamlpp \(learn_inner_lr\): InnerLoop.optimizer"):
        fm.algorithms.mamlpp(apply, F.mse_loss, inner)
    with pytest.raises(ValueError, match="adapt: rates: InnerLoop.optimizer"):
        fm.adapt(apply, params, buffers, tasks.support_x[0], tasks.support_y[0], F.mse_loss,
                 inner, rates=lambda name, t: 0.1)  # fmt: skip


def test_command_line_inner_optimizer(tmp_path, capsys):
    tiny = ["--steps", "2", "--steps-per-epoch", "2", "--meta-batch-size", "4", "--hidden", "8",
            "--val-tasks", "0", "--test-tasks", "5", "--no-progress", "--no-plots",
            "--no-baseline"]  # fmt: skip
    out = tmp_path / "adam"
    assert main(["train", *tiny, "--inner-optimizer", "adam", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["inner_optimizer"] == "adam"
    assert main(["evaluate", str(out), "--test-tasks", "5"]) == 0
    capsys.readouterr()
    bad = ["train", *tiny, "--algorithm", "metasgd", "--inner-optimizer", "momentum",
           "--output-dir", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 1
    assert "metasgd: InnerLoop.optimizer" in capsys.readouterr().err


def test_recipes_build_the_named_inner_update():
    from functional_meta.recipes import inner_loop

    config = dict(inner_lr=0.02, inner_steps=2, inner_clip=None)
    assert inner_loop(config) == InnerLoop(lr=0.02, steps=2)  # saved before the option: sgd
    momentum = inner_loop(config | {"inner_optimizer": "momentum"})
    assert momentum.lr is None and momentum.optimizer is not None


def test_mamlpp_without_learned_rates_adapts_with_the_inner_optimizer():
    from tests.reference import image_tasks, tiny_conv4

    apply, params, buffers = fm.functionalize(tiny_conv4(dtype=torch.float64))
    tasks = image_tasks(dtype=torch.float64)
    inner = InnerLoop(steps=2, optimizer=LIBRARY["momentum"])
    grads = {}
    for strategy in ("vmap", "loop"):
        record = fm.algorithms.mamlpp(apply, F.cross_entropy, inner, learn_inner_lr=False,
                                      batching=fm.Batching(strategy))  # fmt: skip
        meta, state_buffers = record.init(params, buffers)
        grads[strategy] = record.grad(meta, state_buffers, tasks, epoch=100.0).grads["params"]
    plain = fm.algorithms.mamlpp(apply, F.cross_entropy, InnerLoop(lr=LR, steps=2),
                                 learn_inner_lr=False)  # fmt: skip
    meta, state_buffers = plain.init(params, buffers)
    sgd = plain.grad(meta, state_buffers, tasks, epoch=100.0).grads["params"]
    for key in grads["vmap"]:
        torch.testing.assert_close(grads["vmap"][key], grads["loop"][key], rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(grads["vmap"][k], sgd[k]) for k in sgd)  # momentum acted


@pytest.mark.parametrize(
    "optimizer",
    [
        optim.sgd(LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.01),
        optim.sgd(LR, momentum=MOMENTUM, dampening=0.5),
        optim.adamw(LR, weight_decay=0.1),
        optim.adam(optim.cosine_decay(LR, 3), weight_decay=0.01),
        optim.chain(optim.clip_by_global_norm(1.0), optim.adam(LR)),
    ],
    ids=["nesterov-wd", "dampening", "adamw", "adam-schedule-l2", "chain-clip-adam"],
)
def test_every_optimizer_of_the_library_runs_inside_vmap_as_in_the_loop(problem, optimizer):
    _, params, tasks = problem
    inner = InnerLoop(steps=3, optimizer=optimizer)
    vmapped = meta_grad(inner, params, tasks, fm.Batching("vmap"))
    looped = meta_grad(inner, params, tasks, fm.Batching("loop"))
    for key in params:
        assert torch.isfinite(vmapped[key]).all()
        torch.testing.assert_close(vmapped[key], looped[key], rtol=1e-9, atol=1e-12)
