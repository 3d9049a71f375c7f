"""Bad input gets a clear error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from tests.reference import image_tasks, regression_tasks, tiny_conv4, tiny_mlp


@pytest.fixture(scope="module")
def mlp():
    return fm.functionalize(tiny_mlp())


@pytest.fixture(scope="module")
def conv():
    return fm.functionalize(tiny_conv4())


def maml(model, tasks, **overrides):
    apply, params, buffers = model
    options = dict(apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(lr=0.1))
    options.update(overrides)
    return fm.maml_grad(options.pop("params", params), tasks, **options)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t: (t[0][:2], *t[1:]), ValueError, "leading task axis T must agree"),
        (
            lambda t: (t[0], t[1], torch.rand(4, 7, 2), t[3]),
            ValueError,
            "support and query features",
        ),
        (lambda t: (t[0][:, :0], t[1][:, :0], t[2], t[3]), ValueError, "support set is empty"),
        (lambda t: (t[0], t[1][:, :3], t[2], t[3]), ValueError, "support_y: expected shape"),
        (
            lambda t: (t[0], t[1] > 0, t[2], t[3]),
            TypeError,
            "support_y: expected integer class labels",
        ),
        (lambda t: (1.0, *t[1:]), TypeError, "support_x: expected a torch.Tensor"),
    ],
    ids=["task-axis", "feature-shape", "empty-support", "label-shape", "bool-labels", "not-tensor"],
)
def test_task_batch_rejects_malformed_tensors(change, error, message):
    with pytest.raises(error, match=message):
        fm.TaskBatch(*change(regression_tasks().tensors()))


def test_negative_class_labels_are_rejected():
    sx, sy, qx, qy = image_tasks().tensors()
    with pytest.raises(ValueError, match="support_y: class labels must be >= 0"):
        fm.TaskBatch(sx, sy - 1, qx, qy)


def test_classification_labels_out_of_range(conv):
    sx, sy, qx, qy = image_tasks().tensors()
    # In the first task the probe's loss finds it; in a later one the label range check.
    with pytest.raises(ValueError, match=r"tasks.query_y\[0\] \[6\].*Target 3 is out of bounds"):
        maml(conv, fm.TaskBatch(sx, sy, qx, qy + 1), loss=F.cross_entropy)
    later = qy.clone()
    later[1:] += 1
    with pytest.raises(
        ValueError, match=r"query_y: label 3 is out of range for a model with 3 outputs"
    ):
        maml(conv, fm.TaskBatch(sx, sy, qx, later), loss=F.cross_entropy)


def test_classification_labels_of_the_wrong_dtype(conv):
    sx, sy, qx, qy = image_tasks().tensors()
    with pytest.raises(
        ValueError, match="support_y.* fails: RuntimeError: expected target dtype to be Long"
    ):
        maml(conv, fm.TaskBatch(sx, sy.int(), qx, qy.int()), loss=F.cross_entropy)


def test_regression_targets_that_do_not_match_the_output(mlp):
    """mse_loss only warns when it broadcasts [N, 1] against [N]: the probe makes its
    warning the error, with the shapes."""
    sx, sy, qx, qy = regression_tasks().tensors()
    with pytest.raises(
        ValueError,
        match=r"loss: mse_loss\(output, target\) on the model's output \[5, 1\] for "
        r"tasks.support_x\[0\] and the targets tasks.support_y\[0\] \[5\] .* fails: "
        r"UserWarning: Using a target size",
    ):
        maml(mlp, fm.TaskBatch(sx, sy[..., 0], qx, qy[..., 0]))


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"steps": 0}, ValueError, "InnerLoop.steps: expected an integer >= 1, got 0"),
        ({"steps": 1.5}, ValueError, "InnerLoop.steps: expected an integer >= 1, got 1.5"),
        ({"lr": 0.0}, ValueError, "InnerLoop.lr: expected a positive finite number, got 0.0"),
        ({"lr": -0.1}, ValueError, "InnerLoop.lr: expected a positive finite number"),
        ({"lr": -1}, ValueError, "InnerLoop.lr: expected a positive finite number, got -1"),
        ({"lr": torch.tensor(-1.0)}, TypeError, "InnerLoop.lr: expected a positive finite number"),
        (
            {"lr": float("nan")},
            ValueError,
            "InnerLoop.lr: expected a positive finite number, got nan",
        ),
        (
            {"lr": {"head.weight": 0.1}},
            TypeError,
            "InnerLoop.lr: expected a positive finite number",
        ),
        ({"clip": -1.0}, ValueError, "InnerLoop.clip: expected a positive finite number"),
        ({"first_order": 1}, TypeError, "InnerLoop.first_order: expected a bool"),
        ({"adapted": "head.weight"}, TypeError, "InnerLoop.adapted: expected None, a collection"),
    ],
)
def test_bad_inner_settings_are_refused_when_the_inner_loop_is_built(settings, error, message):
    with pytest.raises(error, match=message):
        fm.InnerLoop(**settings)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"inner": fm.InnerLoop(adapted={"nope"})}, KeyError, "InnerLoop.adapted: unknown parameter names"),
        ({"inner": fm.InnerLoop(adapted=lambda n: False)}, ValueError, "InnerLoop.adapted: the selection chose no parameter"),
        ({"step_weights": torch.ones(3)}, ValueError, "step_weights: expected 1 finite weights"),
    ],
)  # fmt: skip
def test_bad_settings_for_the_model(mlp, overrides, error, message):
    with pytest.raises(error, match=message):
        maml(mlp, regression_tasks(), **overrides)


def test_bad_batching_is_refused_when_it_is_built():
    with pytest.raises(ValueError, match="strategy: expected one of"):
        fm.Batching("pmap")
    with pytest.raises(ValueError, match="chunk_size: expected None or an integer >= 1"):
        fm.Batching("vmap", 0)


def test_inputs_the_model_cannot_take(mlp):
    sx, sy, qx, qy = regression_tasks().tensors()
    with pytest.raises(
        ValueError, match=r"tasks.support_x: the model cannot run on examples of shape \(2,\)"
    ):
        maml(mlp, fm.TaskBatch(sx.expand(-1, -1, 2), sy, qx.expand(-1, -1, 2), qy))


def test_params_that_do_not_match_the_model(mlp):
    _, params, _ = mlp
    wrong = {**params, "extra.weight": torch.zeros(1)}
    del wrong["head.bias"]
    with pytest.raises(KeyError, match=r"missing \['head.bias'\], unexpected \['extra.weight'\]"):
        maml(mlp, regression_tasks(), params=wrong)


def test_tasks_must_be_a_task_batch(mlp):
    with pytest.raises(TypeError, match="tasks: expected a TaskBatch"):
        maml(mlp, regression_tasks().tensors())


def test_non_finite_meta_loss_raises_and_updates_nothing(mlp):
    apply, params, buffers = mlp
    sx, sy, qx, qy = regression_tasks().tensors()
    qy = qy.clone()
    qy[1, 0, 0] = float("nan")
    opt = fm.optim.sgd(0.1)
    with pytest.raises(fm.NonFiniteError, match="non-finite meta-loss"):
        fm.maml_step(
            params, opt.init(params), fm.TaskBatch(sx, sy, qx, qy),
            optimizer=opt, apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(lr=0.1),
        )  # fmt: skip


def test_functionalize_rejects_what_it_cannot_use():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        fm.functionalize(lambda x: x)
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        fm.functionalize(tiny_mlp(), batch_norm="frozen")


def test_an_empty_meta_batch_is_refused_naming_the_tasks(mlp):
    sx, sy, qx, qy = regression_tasks().tensors()
    with pytest.raises(ValueError, match=r"tasks: the meta-batch is empty \(T = 0\)"):
        maml(mlp, fm.TaskBatch(sx[:0], sy[:0], qx[:0], qy[:0]))


def test_parameters_of_the_wrong_shape_are_blamed_on_the_parameters(mlp):
    _, params, _ = mlp
    wider = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"meta_params\['params'\] do not fit the model: "
                       r"'features.0.bias' has shape \(17,\), the model's is \(16,\)"):  # fmt: skip
        maml(mlp, regression_tasks(), params=wider)


def test_inputs_without_a_feature_axis_get_a_hint(mlp):
    sx, sy, qx, qy = regression_tasks().tensors()
    with pytest.raises(ValueError, match=r"support_x \[4, 5\] has no feature axis: .*unsqueeze"):
        maml(mlp, fm.TaskBatch(sx[..., 0], sy, qx[..., 0], qy))


def record_and_state(model, loss=F.mse_loss, name="maml"):
    apply, params, buffers = model
    algorithm = fm.algorithms.build(name, apply, loss, fm.InnerLoop(lr=0.1))
    return algorithm, fm.init_state(algorithm, params, buffers, fm.optim.sgd(0.1))


def test_adapt_with_zero_steps_predicts_with_the_meta_parameters(mlp):
    algorithm, state = record_and_state(mlp)
    sx, sy, qx, _ = regression_tasks().tensors()
    adapted = algorithm.adapt(state.meta_params, state.buffers, sx[0], sy[0], steps=0)
    expected = mlp[0](state.meta_params["params"], state.buffers, qx[0])
    torch.testing.assert_close(algorithm.predict(adapted, qx[0]), expected)
    with pytest.raises(ValueError, match="steps: expected None or an integer >= 0, got -1"):
        algorithm.adapt(state.meta_params, state.buffers, sx[0], sy[0], steps=-1)


def test_adapt_refuses_a_batch_of_tasks(mlp, conv):
    algorithm, state = record_and_state(conv, F.cross_entropy)
    sx, sy, _, _ = image_tasks().tensors()
    with pytest.raises(ValueError, match=r"shape \(3, 3, 1, 16, 16\) .* is a batch of 3 tasks"):
        algorithm.adapt(state.meta_params, state.buffers, sx, sy)
    algorithm.adapt(state.meta_params, state.buffers, sx[0], sy[0])  # one task is fine
    # Regression: told apart by the examples the model was checked with.
    algorithm, state = record_and_state(mlp)
    tasks = regression_tasks()
    algorithm.grad(state.meta_params, state.buffers, tasks)
    with pytest.raises(ValueError, match=r"shape \(4, 5, 1\) .* is a batch of 4 tasks"):
        algorithm.adapt(state.meta_params, state.buffers, tasks.support_x, tasks.support_y)
    with pytest.raises(ValueError, match="expected one task's support set .* with the same S"):
        algorithm.adapt(
            state.meta_params, state.buffers, tasks.support_x[0], tasks.support_y[1, :3]
        )
    fm.evaluate(algorithm, state, tasks)  # evaluation adapts task by task (under vmap)


def test_mamlpp_refuses_a_plain_function_for_a_model():
    with pytest.raises(TypeError, match=r"MAML\+\+ needs the FunctionalModel"):
        fm.algorithms.mamlpp(lambda p, b, x: x, F.mse_loss, fm.InnerLoop())


def batch_norm_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )


@pytest.mark.parametrize("under_vmap", [False, True])
def test_batch_norm_with_one_example_raises_like_nn_batchnorm(under_vmap):
    apply, params, buffers = fm.functionalize(batch_norm_mlp())
    x = torch.randn(3, 1, 1)
    run = lambda x: apply(params, buffers, x)  # noqa: E731
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.func.vmap(run)(x) if under_vmap else run(x[0])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_mlp().train()(x[0])  # what it imitates
    assert run(torch.randn(2, 1)).shape == (2, 1)  # two examples are a batch


def test_a_one_shot_support_set_with_batch_norm_is_blamed_on_the_tasks():
    model = fm.functionalize(batch_norm_mlp())
    sx, sy, qx, qy = regression_tasks().tensors()
    with pytest.raises(ValueError, match=r"tasks.support_x: .*more than 1 value per channel"):
        maml(model, fm.TaskBatch(sx[:, :1], sy[:, :1], qx, qy))


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile"])
@pytest.mark.parametrize(
    ("part", "value", "message"),
    [
        ("loss", "mse", "loss: expected a callable, got str"),
        ("inner", {"lr": 0.1}, r"inner: expected an InnerLoop .* got dict"),
        ("batching", "vmap", r"batching: expected a Batching .* got str"),
        ("model", None, "model: expected a callable, got NoneType"),
    ],
)
def test_algorithm_constructors_name_a_part_of_the_wrong_kind(conv, name, part, value, message):
    parts = dict(model=conv[0], loss=F.cross_entropy, inner=fm.InnerLoop(lr=0.1),
                 batching=fm.Batching())  # fmt: skip
    parts[part] = value
    constructor = getattr(fm.algorithms, name)
    with pytest.raises(TypeError, match=message):
        constructor(parts["model"], parts["loss"], parts["inner"], batching=parts["batching"])


def test_init_state_and_step_name_arguments_of_the_wrong_kind(mlp):
    algorithm, state = record_and_state(mlp)
    optimizer = fm.optim.sgd(0.1)
    with pytest.raises(TypeError, match="params: expected a dict of tensors"):
        fm.init_state(algorithm, list(mlp[1].values()), mlp[2], optimizer)
    with pytest.raises(TypeError, match="state: expected a TrainState from init_state, got tuple"):
        fm.step(algorithm, tuple(state), regression_tasks(), optimizer)


@pytest.mark.parametrize("device", ["foo", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is available"))])  # fmt: skip
def test_fit_and_evaluate_name_a_device_that_is_not_one(mlp, device):
    algorithm, state = record_and_state(mlp)
    with pytest.raises(ValueError, match=f"device: '{device}'"):
        fm.evaluate(algorithm, state, regression_tasks(), device=device)
    with pytest.raises(ValueError, match=f"device: '{device}'"):
        fm.fit(algorithm, state, [regression_tasks()], optimizer=fm.optim.sgd(0.1), device=device)


@pytest.mark.parametrize("name", ["imaml", "protonets"])
def test_every_record_checks_its_parts_when_built(name):
    """iMAML and ProtoNets name a wrong part as the other constructors do."""
    with pytest.raises(TypeError, match="loss: expected a callable"):
        fm.algorithms.build(name, lambda p, b, x: x, "cross_entropy", fm.InnerLoop())
    with pytest.raises(TypeError, match="inner: expected an InnerLoop"):
        fm.algorithms.build(name, lambda p, b, x: x, F.cross_entropy, 0.4)


def test_imaml_adapt_refuses_a_batch_of_tasks_and_negative_steps(conv):
    algorithm, state = record_and_state(conv, F.cross_entropy, name="imaml")
    sx, sy, _, _ = image_tasks().tensors()
    with pytest.raises(ValueError, match=r"is a batch of 3 tasks"):
        algorithm.adapt(state.meta_params, state.buffers, sx, sy)
    with pytest.raises(ValueError, match="steps"):
        algorithm.adapt(state.meta_params, state.buffers, sx[0], sy[0], steps=-1)
