"""Dropout as PyTorch users write it: on in training (inner loop and query alike), off in
evaluation; under vmap each task draws its own masks; seeded runs repeat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functional_meta as fm
from functional_meta.model import evaluation_mode, seeded_randomness
from tests.reference import reference_maml_grad, regression_tasks

STRATEGIES = [fm.Batching("vmap"), fm.Batching("vmap", 2), fm.Batching("loop")]


def dropout_mlp(p: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(
        "features",
        nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(p), nn.Linear(32, 32), nn.Tanh()),
    )
    model.add_module("drop", nn.Dropout(p))
    model.add_module("head", nn.Linear(32, 1))
    return model.to(dtype)


def options(apply, buffers, batching, steps=1):
    return dict(apply=apply, buffers=buffers, loss=F.mse_loss,
                inner=fm.InnerLoop(lr=0.1, steps=steps), batching=batching)  # fmt: skip


def test_functionalize_follows_the_modules_mode():
    module = dropout_mlp(0.5)
    apply, params, buffers = fm.functionalize(module)
    assert apply.training and apply.random
    x = torch.randn(64, 1)
    assert not torch.equal(apply(params, buffers, x), apply(params, buffers, x))
    for deterministic in (fm.functionalize(module.eval())[0], apply.using(training=False)):
        assert not deterministic.training and not deterministic.random
        torch.testing.assert_close(deterministic(params, buffers, x), module.eval()(x))
    assert module.training is False  # only the explicit .eval() above changed it
    # One evaluation copy per model, not one per maml_step call (each builds a record).
    assert evaluation_mode(apply) is evaluation_mode(apply) is not apply
    assert evaluation_mode(deterministic) is deterministic
    with pytest.raises(TypeError, match="using: training must be None or a bool"):
        apply.using(training="no")


@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunks", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_with_p_zero_every_strategy_equals_the_autograd_reference(batching, first_order):
    module = dropout_mlp(0.0, torch.float64)
    apply, params, buffers = fm.functionalize(module)
    assert apply.random  # training mode: the randomness path runs, it just never drops
    tasks = regression_tasks(dtype=torch.float64)
    settings = options(apply, buffers, batching, steps=2)
    settings["inner"] = fm.InnerLoop(lr=0.1, steps=2, first_order=first_order)
    grads, _ = fm.maml_grad(params, tasks, **settings)
    expected, _ = reference_maml_grad(module, params, tasks, inner_steps=2,
                                      first_order=first_order)  # fmt: skip
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12)


def test_the_loop_draws_the_masks_a_hand_written_loop_draws():
    """Task by task, the loop draws in the order an autograd loop over the module does
    (support forward, then query forward), so from the same seed the masks and the
    second-order meta-gradient are the same: dropout is really in the inner loop and in
    the query forward."""
    module = dropout_mlp(0.5, torch.float64)
    apply, params, buffers = fm.functionalize(module)
    tasks = regression_tasks(dtype=torch.float64)
    torch.manual_seed(7)
    grads, _ = fm.maml_grad(params, tasks, **options(apply, buffers, fm.Batching("loop")))
    torch.manual_seed(7)
    expected, _ = reference_maml_grad(module, params, tasks)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12)
    torch.manual_seed(8)
    other, _ = fm.maml_grad(params, tasks, **options(apply, buffers, fm.Batching("loop")))
    assert not torch.equal(other["head.weight"], grads["head.weight"])


@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunks", "loop"])
def test_each_task_draws_its_own_masks_at_the_right_scale(batching):
    p = 0.25
    apply, params, buffers = fm.functionalize(nn.Sequential(nn.Dropout(p)))
    ones = torch.ones(6, 400, 8)
    tasks = fm.TaskBatch(ones, torch.zeros(6, 400), ones, torch.zeros(6, 400))
    out = fm.over_tasks(lambda q, task: apply(q, buffers, task.support_x), batching)(params, tasks)
    assert out.shape == (6, 400, 8)
    kept = out != 0
    # Inverted dropout: kept values are scaled by 1/(1-p), so the mean stays 1.
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.03
    masks = kept.reshape(6, -1)
    assert all(not torch.equal(masks[i], masks[j]) for i in range(6) for j in range(i))


@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunks", "loop"])
def test_a_generator_repeats_the_masks_and_leaves_the_global_state_alone(batching):
    apply, params, buffers = fm.functionalize(dropout_mlp(0.5))
    tasks = regression_tasks()
    settings = options(apply, buffers, batching)

    def grads(seed):
        return fm.maml_grad(params, tasks, generator=torch.Generator().manual_seed(seed),
                            **settings)[0]  # fmt: skip

    before = torch.get_rng_state()
    first, again, other = grads(0), grads(0), grads(1)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(first[k], again[k]) for k in params)
    assert not torch.equal(first["head.weight"], other["head.weight"])
    # Without a generator the global one draws them, as torch.manual_seed sets it.
    torch.manual_seed(3)
    plain = fm.maml_grad(params, tasks, **settings)[0]
    torch.manual_seed(3)
    assert torch.equal(
        plain["head.weight"], fm.maml_grad(params, tasks, **settings)[0]["head.weight"]
    )


def test_a_deterministic_model_takes_nothing_from_the_generator():
    apply, _, _ = fm.functionalize(dropout_mlp(0.5).eval())
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with seeded_randomness(apply, generator, "cpu"):
        pass
    assert torch.equal(generator.get_state(), state)


def test_evaluation_adapts_and_predicts_without_dropout():
    module = dropout_mlp(0.5)
    apply, params, buffers = fm.functionalize(module)
    eval_apply, _, _ = fm.functionalize(dropout_mlp(0.5).eval())
    tasks = regression_tasks()
    inner = fm.InnerLoop(lr=0.1, steps=3)
    for name in ("maml", "reptile", "metasgd", "mamlpp"):
        trained = fm.algorithms.build(name, apply, F.mse_loss, inner)
        deterministic = fm.algorithms.build(name, eval_apply, F.mse_loss, inner)
        state = fm.init_state(trained, params, buffers, fm.optim.sgd(0.1))
        first = fm.evaluate(trained, state, tasks)
        assert torch.equal(first.losses, fm.evaluate(trained, state, tasks).losses)
        assert torch.equal(first.losses, fm.evaluate(deterministic, state, tasks).losses)
        adapted = trained.adapt(state.meta_params, buffers, tasks.support_x[0], tasks.support_y[0])
        x = tasks.query_x[0]
        assert torch.equal(trained.predict(adapted, x), trained.predict(adapted, x))


@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunks", "loop"])
def test_training_with_dropout_runs_under_every_strategy_and_algorithm(batching):
    apply, params, buffers = fm.functionalize(dropout_mlp(0.3))
    tasks = regression_tasks()
    for name in ("maml", "anil", "metasgd", "mamlpp", "reptile"):
        algorithm = fm.algorithms.build(name, apply, F.mse_loss, fm.InnerLoop(lr=0.05, steps=2),
                                        batching=batching)  # fmt: skip
        state = fm.init_state(algorithm, params, buffers, fm.optim.adam(1e-3))
        generator = torch.Generator().manual_seed(0)
        _, metrics = fm.step(algorithm, state, tasks, fm.optim.adam(1e-3), generator=generator)
        assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_compile_refuses_a_model_with_dropout_when_the_record_is_built():
    """torch.compile of torch 2.13 fails on dropout under vmap with dynamic shapes (seen
    when a second model recompiles the same step), so the strategy refuses it at once."""
    apply, params, buffers = fm.functionalize(dropout_mlp(0.5))
    with pytest.raises(ValueError, match='strategy "compile" cannot train a model that draws'):
        fm.maml_grad(params, regression_tasks(), **options(apply, buffers, fm.Batching("compile")))
    with pytest.raises(ValueError, match='Use Batching\\("vmap"\\)'):
        fm.algorithms.metasgd(apply, F.mse_loss, batching=fm.Batching("compile"))
    eval_apply, _, _ = fm.functionalize(dropout_mlp(0.5).eval())
    fm.algorithms.maml(eval_apply, F.mse_loss, batching=fm.Batching("compile"))  # accepted
