"""MAML meta-gradients: strategies vmap == chunked vmap == loop == auto == a hand-written autograd reference.

Tolerances: in float64 the paths agree to 1e-10 (relative to the largest gradient entry);
in float32 to 1e-4 relative: the float32 reference itself is 2e-5 relative away from
the float64 value on the batch-normalised conv net (three-example batches are ill-conditioned).
The conv net's reference uses native ``BatchNorm2d`` in training mode; the library uses
its primitive batch norm under vmap, so these tests also hold the two implementations equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from tests.reference import (
    image_tasks,
    reference_maml_grad,
    regression_tasks,
    tiny_conv4,
    tiny_mlp,
)

STRATEGIES = [fm.Batching("vmap"), fm.Batching("vmap", 2), fm.Batching("loop"), fm.Batching()]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_trees_close(actual, expected, dtype):
    scale = max(float(v.abs().max()) for v in expected.values())
    assert actual.keys() == expected.keys()
    for name in expected:
        error = float((actual[name] - expected[name]).abs().max())
        assert error <= TOLERANCE[dtype] * scale, (
            f"{name}: max error {error:.3g} (scale {scale:.3g})"
        )


def problem(kind, dtype):
    if kind == "mlp":
        return tiny_mlp(dtype), regression_tasks(dtype=dtype), F.mse_loss, 0.05
    return tiny_conv4(dtype=dtype), image_tasks(dtype=dtype), F.cross_entropy, 0.4


ALGORITHMS = {
    "maml": ({"first_order": False}, None),
    "fomaml": ({"first_order": True}, None),
    "msl": ({"first_order": False, "inner_steps": 3}, torch.tensor([0.2, 0.3, 0.5])),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_meta_gradient_matches_autograd_reference(kind, algorithm, dtype):
    module, tasks, loss_fn, lr = problem(kind, dtype)
    options, step_weights = ALGORITHMS[algorithm]
    options = {"inner_steps": 2, **options}
    apply, params, buffers = fm.functionalize(module)
    expected, _ = reference_maml_grad(
        module, params, tasks, loss_fn, lr, step_weights=step_weights, **options
    )
    inner = fm.InnerLoop(lr=lr, steps=options["inner_steps"], first_order=options["first_order"])
    for batching in STRATEGIES:
        grads, metrics = fm.maml_grad(
            params, tasks, apply=apply, buffers=buffers, loss=loss_fn, inner=inner,
            batching=batching, step_weights=step_weights,
        )  # fmt: skip
        assert_trees_close(grads, expected, dtype)
        assert len(metrics["support_losses"]) == options["inner_steps"]


def test_float64_gradcheck_and_gradgradcheck_of_the_task_loss():
    module = tiny_mlp(torch.float64)
    module[0] = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh())
    module.head = torch.nn.Linear(3, 1)
    module = module.double()
    apply, params, buffers = fm.functionalize(module)
    task = regression_tasks(num_tasks=1, support=3, query=4, dtype=torch.float64)[0]
    names = sorted(params)

    def task_loss(*flat):
        loss, _ = fm.maml_loss(
            dict(zip(names, flat, strict=True)),
            task,
            apply=apply,
            buffers=buffers,
            loss=F.mse_loss,
            inner=fm.InnerLoop(lr=0.1, steps=2),
        )
        return loss

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(task_loss, inputs)
    assert torch.autograd.gradgradcheck(task_loss, inputs)


def test_first_order_differs_from_second_order_and_is_the_query_gradient_at_adapted_params():
    module = tiny_mlp(torch.float64)
    apply, params, buffers = fm.functionalize(module)
    tasks = regression_tasks(dtype=torch.float64)
    common = dict(apply=apply, buffers=buffers, loss=F.mse_loss)
    second, _ = fm.maml_grad(params, tasks, inner=fm.InnerLoop(lr=0.1, steps=2), **common)
    first, _ = fm.maml_grad(
        params, tasks, inner=fm.InnerLoop(lr=0.1, steps=2, first_order=True), **common
    )
    gap = max(float((second[k] - first[k]).abs().max()) for k in params)
    assert gap > 1e-3, "the Hessian term should matter on a tanh network"

    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(tasks)):
        task = tasks[i]
        adapted = fm.adapt(
            apply, params, buffers, task.support_x, task.support_y, F.mse_loss,
            fm.InnerLoop(lr=0.1, steps=2),
        ).params  # fmt: skip
        adapted = fm.tree.detach(adapted)
        query_grad = torch.func.grad(
            lambda p, task=task: F.mse_loss(apply(p, buffers, task.query_x), task.query_y)
        )(adapted)
        expected = {k: expected[k] + query_grad[k] / len(tasks) for k in params}
    assert_trees_close(first, expected, torch.float64)


def test_adapt_returns_support_losses_and_leaves_inputs_untouched():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    task = regression_tasks()[0]
    before = {k: v.clone() for k, v in params.items()}
    result = fm.adapt(
        apply, params, buffers, task.support_x, task.support_y, F.mse_loss,
        fm.InnerLoop(lr=0.05, steps=3),
    )  # fmt: skip
    assert result.support_losses.shape == (3,)
    assert result.support_losses[-1] < result.support_losses[0]
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert not any(torch.equal(result.params[k], params[k]) for k in params)


def test_adapt_with_a_filter_moves_only_the_chosen_parameters():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    task = regression_tasks()[0]
    result = fm.adapt(
        apply, params, buffers, task.support_x, task.support_y, F.mse_loss,
        fm.InnerLoop(lr=0.05, steps=2, adapted={"head.weight", "head.bias"}),
    )  # fmt: skip
    for name in params:
        moved = not torch.equal(result.params[name], params[name])
        assert moved == name.startswith("head."), name


def test_maml_step_updates_parameters_and_is_pure():
    apply, params, buffers = fm.functionalize(tiny_conv4())
    tasks = image_tasks()
    opt = fm.optim.adam(1e-3)
    state = opt.init(params)
    before = {k: v.clone() for k, v in params.items()}
    tensors_before = [t.clone() for t in tasks.tensors()]
    new_params, new_state, metrics = fm.maml_step(
        params,
        state,
        tasks,
        optimizer=opt,
        apply=apply,
        buffers=buffers,
        loss=F.cross_entropy,
        inner=fm.InnerLoop(lr=0.4),
    )
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(a, b) for a, b in zip(tasks.tensors(), tensors_before, strict=True))
    assert int(state["count"]) == 0 and int(new_state["count"]) == 1
    assert any(not torch.equal(new_params[k], params[k]) for k in params)
    assert set(metrics) >= {"loss", "accuracy", "support_losses", "query_loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert isinstance(metrics["loss"], float)


def test_batch_norm_running_mode_uses_the_buffers():
    module = tiny_conv4()
    bn = module.features[1]
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    apply, params, buffers = fm.functionalize(module, batch_norm="running")
    x = torch.rand(4, 1, 16, 16)
    expected = module.eval()(x)
    torch.testing.assert_close(apply(params, buffers, x), expected, rtol=1e-5, atol=1e-6)
    batch_apply, _, _ = fm.functionalize(module, batch_norm="batch")
    torch.testing.assert_close(
        batch_apply(params, buffers, x), module.train()(x), rtol=1e-5, atol=1e-6
    )
