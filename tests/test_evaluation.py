"""evaluate: the confidence-interval formula, batching, no outer graph, zero steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from functional_meta import (
    Batching,
    InnerLoop,
    algorithms,
    functionalize,
    init_state,
    models,
    optim,
)
from functional_meta.data import FewShotSampler, fixed_tasks
from functional_meta.evaluation import confidence_interval, evaluate, sinusoid_test_tasks


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading only adds overhead on shared cores
    yield
    torch.set_num_threads(threads)


def setup(algorithm="maml", sizes=(1, 8, 1)):
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.mlp(sizes))
    algorithm = algorithms.build(algorithm, apply, F.mse_loss, InnerLoop(lr=0.01, steps=2))
    return algorithm, apply, init_state(algorithm, params, buffers, optim.adam(1e-3))


def test_confidence_interval_formula():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, half = confidence_interval(values)
    std = math.sqrt(sum((v - 3.5) ** 2 for v in [1, 2, 4, 7]) / 4)  # population std
    assert mean == pytest.approx(3.5)
    assert half == pytest.approx(1.96 * std / 2)
    assert confidence_interval([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        confidence_interval([])
    with pytest.raises(ValueError, match="NaN"):
        confidence_interval([1.0, float("nan")])


def test_evaluate_matches_per_task_loop_and_interval():
    learner, _, state = setup()
    batches = sinusoid_test_tasks(30, seed=4, batch_size=7)
    result = evaluate(learner, state, batches, steps=3)
    assert result.num_tasks == 30 and result.steps == 3 and result.accuracy is None
    loop = learner._replace(batching=Batching("loop"))
    reference = evaluate(loop, state, sinusoid_test_tasks(30, seed=4, batch_size=30), steps=3)
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-6)
    mean, half = confidence_interval(result.losses)
    assert (result.loss, result.loss_ci) == pytest.approx((mean, half))
    assert "±" in str(result)
    assert evaluate(learner, state, batches, num_tasks=10).num_tasks == 10


def test_evaluate_builds_no_outer_graph():
    learner, _, state = setup()
    params = {k: v.requires_grad_(True) for k, v in state.meta_params["params"].items()}
    state = state._replace(meta_params={"params": params})
    result = evaluate(learner, state, sinusoid_test_tasks(8))
    assert not result.losses.requires_grad and result.losses.grad_fn is None
    assert all(p.grad is None for p in params.values())


def test_zero_steps_scores_the_meta_parameters():
    learner, apply, state = setup()
    tasks = sinusoid_test_tasks(12)[0]
    result = evaluate(learner, state, tasks, steps=0)
    with torch.no_grad():
        direct = torch.stack([F.mse_loss(apply(state.meta_params["params"], {}, x), y)
                              for x, y in zip(tasks.query_x, tasks.query_y, strict=True)])  # fmt: skip
    torch.testing.assert_close(result.losses, direct)


def test_classification_accuracy_and_metasgd():
    torch.manual_seed(0)
    images = torch.randn(6, 5, 4)  # 6 classes, 5 examples each, 4 features
    sampler = FewShotSampler(images, ways=3, shots=1, queries=2)
    apply, params, buffers = functionalize(models.mlp((4, 8, 3)))
    learner = algorithms.metasgd(apply, F.cross_entropy, InnerLoop(lr=0.1))
    state = init_state(learner, params, buffers, optim.adam(1e-3))
    result = evaluate(learner, state, fixed_tasks(sampler, 20, batch_size=8), steps=3)
    assert result.num_tasks == 20 and 0.0 <= result.accuracy <= 1.0 and result.accuracy_ci >= 0


def test_evaluate_errors_name_the_argument():
    learner, _, state = setup()
    with pytest.raises(ValueError, match="steps"):
        evaluate(learner, state, sinusoid_test_tasks(4), steps=-1)
    with pytest.raises(TypeError, match="tasks"):
        evaluate(learner, state, 3)
    with pytest.raises(ValueError, match="tasks"):
        evaluate(learner, state, [])
    with pytest.raises(TypeError, match="algorithm"):
        evaluate("maml", state, sinusoid_test_tasks(4))


def test_own_loop_parameters_are_scored_like_a_train_state():
    """A user of maml_step/metasgd_step holds a parameter dict, not a TrainState."""
    tasks = sinusoid_test_tasks(8, seed=3)
    for name in ("maml", "metasgd"):
        algorithm, _, state = setup(name)
        expected = evaluate(algorithm, state, tasks)
        held = state.meta_params if name == "metasgd" else state.meta_params["params"]
        got = evaluate(algorithm, held, tasks, buffers=state.buffers)
        assert got.loss == expected.loss and got.num_tasks == expected.num_tasks
    with pytest.raises(ValueError, match="buffers: a TrainState holds its own"):
        evaluate(algorithm, state, tasks, buffers={})
    with pytest.raises(TypeError, match="state: expected a TrainState or a non-empty dict"):
        evaluate(algorithm, [1.0], tasks)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_evaluate_names_tasks_the_model_cannot_score(strategy):
    algorithm, _, state = setup()
    algorithm = algorithm._replace(batching=Batching(strategy))
    tasks = sinusoid_test_tasks(4, batch_size=4)[0]
    sx, sy, qx, qy = tasks.tensors()
    with pytest.raises(ValueError, match=r"tasks: the meta-batch is empty \(T = 0\)"):
        evaluate(algorithm, state, tasks[:0])
    with pytest.raises(
        ValueError, match=r"tasks: the model cannot run on tasks of support_x \(4, 10, 2\)"
    ):
        evaluate(algorithm, state, type(tasks)(sx.expand(-1, -1, 2), sy, qx.expand(-1, -1, 2), qy))
    wrong = type(tasks)(sx, sy.expand(-1, -1, 3), qx, qy.expand(-1, -1, 3))
    with pytest.raises(ValueError, match=r"loss: mse_loss.*targets tasks.query_y\[0\] \[10, 3\]"):
        evaluate(algorithm, state, wrong)  # a loss would broadcast them silently


def test_the_scorability_check_runs_once_per_task_shape_not_once_per_batch():
    """``check_scorable`` probes the model on a batch's first task; batches of the same
    shape need it once (with one task per batch it used to double the cost), and a batch of
    another shape is still checked."""
    algorithm, _, state = setup()
    probes = []

    def adapt(meta_params, buffers, support_x, support_y, steps=None):
        probes.append(steps)
        return adapt.record(meta_params, buffers, support_x, support_y, steps)

    adapt.record = algorithm.adapt
    counted = algorithm._replace(adapt=adapt, batching=Batching("loop"))
    evaluate(counted, state, sinusoid_test_tasks(6, batch_size=1), steps=1)
    assert probes == [0] + [1] * 6  # one probe (no inner step), then the six tasks
    tasks = sinusoid_test_tasks(2, batch_size=2)[0]
    sx, sy, qx, qy = tasks.tensors()
    wrong = type(tasks)(sx, sy.expand(-1, -1, 3), qx, qy.expand(-1, -1, 3))
    with pytest.raises(ValueError, match=r"loss: mse_loss.*targets tasks.query_y\[0\] \[10, 3\]"):
        evaluate(algorithm, state, [tasks, wrong])  # checked: its shape is new
