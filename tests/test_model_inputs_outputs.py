"""Models as people write them: several inputs (``forward(x, mask)``), outputs that are not
one tensor of the targets' shape (a Gaussian head, a tuple); the loss decides what fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functional_meta as fm
from functional_meta.data import sinusoid_tasks
from tests.reference import reference_maml_grad, regression_tasks

STRATEGIES = [fm.Batching("vmap"), fm.Batching("vmap", 3), fm.Batching("loop")]
IDS = ["vmap", "chunks", "loop"]


class Masked(nn.Module):
    """``forward(x [N, 3], mask [N, 3]) -> [N, 1]``: a model with two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * mask))


class TwoHeads(nn.Module):
    """``forward(x [N, 1]) -> (mean [N, 1], log_var [N, 1])``: a model returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(1, 16), nn.Tanh())
        self.mean, self.log_var = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.mean(h), self.log_var(h)


def nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Gaussian negative log-likelihood without its constant, as ``F.gaussian_nll_loss``
    computes it, in tensor operations only (``F.gaussian_nll_loss`` itself branches on
    ``var < 0``, which ``vmap`` cannot)."""
    return 0.5 * (var.log() + (y - mean) ** 2 / var).mean()


def gaussian_nll(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A Gaussian head ``[N, 2]`` (mean, pre-softplus variance) against targets ``[N, 1]``."""
    return nll(output[:, :1], F.softplus(output[:, 1:]) + 1e-3, y)


def torch_gaussian_nll(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.gaussian_nll_loss(output[:, :1], y, F.softplus(output[:, 1:]) + 1e-3)


def tuple_nll(output: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    mean, log_var = output
    return nll(mean, log_var.exp(), y)


def masked_tasks(keyword: bool = False, dtype: torch.dtype = torch.float64) -> fm.TaskBatch:
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        x = torch.randn(5, n, 3, generator=g, dtype=dtype)
        mask = (torch.rand(5, n, 3, generator=g) > 0.3).to(dtype)
        return dict(x=x, mask=mask) if keyword else (x, mask)

    def targets(n):
        return torch.randn(5, n, 1, generator=g, dtype=dtype)

    return fm.TaskBatch(inputs(4), targets(4), inputs(6), targets(6))


def meta_grad(module, tasks, loss, batching, first_order=False):
    apply, params, buffers = fm.functionalize(module)
    inner = fm.InnerLoop(lr=0.1, steps=2, first_order=first_order)
    grads, metrics = fm.maml_grad(params, tasks, apply=apply, buffers=buffers, loss=loss,
                                  inner=inner, batching=batching)  # fmt: skip
    expected, _ = reference_maml_grad(module, params, tasks, loss, 0.1, 2, first_order)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12)
    return metrics


@pytest.mark.parametrize("keyword", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("batching", STRATEGIES, ids=IDS)
def test_a_two_input_model_equals_the_autograd_reference(batching, first_order, keyword):
    torch.manual_seed(0)
    module = Masked().double()
    meta_grad(module, masked_tasks(keyword), F.mse_loss, batching, first_order)


def test_two_inputs_through_every_algorithm_evaluation_and_adapt_predict():
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(Masked().double())
    tasks = masked_tasks()
    for name, given in [("maml", {}), ("anil", {}), ("metasgd", {}), ("mamlpp", {}),
                        ("reptile", {"batch_size": 5})]:  # fmt: skip
        algorithm = fm.algorithms.build(name, apply, F.mse_loss, fm.InnerLoop(lr=0.05, steps=2),
                                        **given)  # fmt: skip
        state = fm.init_state(algorithm, params, buffers, fm.optim.adam(1e-3))
        state, metrics = fm.step(algorithm, state, tasks, fm.optim.adam(1e-3),
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert metrics["loss"] > 0
        result = fm.evaluate(algorithm, state, tasks)
        assert result.num_tasks == 5 and result.accuracy is None
        adapted = algorithm.adapt(state.meta_params, state.buffers, tasks[0].support_x,
                                  tasks[0].support_y)  # fmt: skip
        assert algorithm.predict(adapted, tasks[0].query_x).shape == (6, 1)


def test_a_model_given_fewer_inputs_than_its_forward_takes_is_told_how_to_pass_them():
    apply, params, buffers = fm.functionalize(Masked().double())
    tasks = masked_tasks()
    one_input = fm.TaskBatch(tasks.support_x[0], tasks.support_y, tasks.query_x[0], tasks.query_y)
    with pytest.raises(
        ValueError,
        match=r"tasks.support_x: the model cannot run on examples of shape \(3,\).*"
        r"missing 1 required positional argument: 'mask'.*as a tuple \(model\(\*x\)\)",
    ):
        fm.maml_grad(params, one_input, apply=apply, buffers=buffers, loss=F.mse_loss,
                     inner=fm.InnerLoop())  # fmt: skip


@pytest.mark.parametrize("batching", STRATEGIES, ids=IDS)
def test_a_gaussian_head_with_targets_of_another_shape_equals_the_reference(batching):
    module = fm.models.mlp((1, 16, 16, 2)).double()
    metrics = meta_grad(module, regression_tasks(dtype=torch.float64), gaussian_nll, batching)
    assert "accuracy" not in metrics


def test_torchs_gaussian_nll_loss_runs_in_the_loop_and_vmap_says_why_it_cannot():
    module = fm.models.mlp((1, 16, 16, 2)).double()
    tasks = regression_tasks(dtype=torch.float64)
    meta_grad(module, tasks, torch_gaussian_nll, fm.Batching("loop"))
    with pytest.raises(
        RuntimeError,
        match=r'strategy "vmap": the per-task function cannot run under torch.func.vmap '
        r'.*F.gaussian_nll_loss.* Batching\("loop"\)',
    ):
        meta_grad(module, tasks, torch_gaussian_nll, fm.Batching("vmap"))


def test_our_gaussian_nll_is_torchs():
    output, y = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    torch.testing.assert_close(gaussian_nll(output, y), torch_gaussian_nll(output, y))


def test_a_gaussian_head_trains_with_maml_step():
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 2)))
    options = dict(apply=apply, buffers=buffers, loss=gaussian_nll,
                   inner=fm.InnerLoop(lr=0.01, steps=1))  # fmt: skip
    algorithm = fm.algorithms.maml(apply, gaussian_nll, options["inner"])
    test_tasks = fm.sinusoid_test_tasks(100)

    def held_out(p):
        return fm.evaluate(algorithm, fm.TrainState({"params": p}, None, buffers), test_tasks)

    before = held_out(params).loss
    optimizer = fm.optim.adam(1e-2)
    opt_state, generator = optimizer.init(params), torch.Generator().manual_seed(0)
    for _ in range(150):
        tasks = sinusoid_tasks(10, generator=generator)
        params, opt_state, _ = fm.maml_step(params, opt_state, tasks, optimizer=optimizer,
                                                  **options)  # fmt: skip
    assert held_out(params).loss < before - 0.5


@pytest.mark.parametrize("batching", STRATEGIES, ids=IDS)
def test_a_model_returning_a_tuple_works_when_the_loss_takes_it(batching):
    torch.manual_seed(0)
    module = TwoHeads().double()
    meta_grad(module, regression_tasks(dtype=torch.float64), tuple_nll, batching)
    apply, params, buffers = fm.functionalize(module)
    algorithm = fm.algorithms.maml(apply, tuple_nll, fm.InnerLoop(lr=0.1), batching=batching)
    state = fm.init_state(algorithm, params, buffers, fm.optim.sgd(0.1))
    result = fm.evaluate(algorithm, state, regression_tasks(dtype=torch.float64))
    assert result.num_tasks == 4 and result.accuracy is None


def test_a_classifier_returning_a_tuple_is_scored_by_its_loss_alone():
    """Accuracy needs one tensor of class scores; for (logits, features) the loss scores."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3))

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x), x.flatten(1)

    apply, params, buffers = fm.functionalize(WithFeatures())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 1, 16, 16, generator=g)
    y = torch.arange(3).repeat(2, 2)
    tasks = fm.TaskBatch(x, y, x, y)
    algorithm = fm.algorithms.maml(apply, lambda out, y: F.cross_entropy(out[0], y))
    state = fm.init_state(algorithm, params, buffers, fm.optim.sgd(0.1))
    _, metrics = fm.step(algorithm, state, tasks, fm.optim.sgd(0.1))
    assert "accuracy" not in metrics
    assert fm.evaluate(algorithm, state, tasks).accuracy is None


@pytest.mark.parametrize(
    "module, loss, message",
    [
        (
            fm.models.mlp((1, 8, 2)),
            F.mse_loss,
            r"loss: mse_loss\(output, target\) on the model's output \[5, 2\] for "
            r"tasks.support_x\[0\] and the targets tasks.support_y\[0\] \[5, 1\] "
            r"\(torch.float32\) fails: UserWarning: Using a target size",
        ),
        (
            TwoHeads(),
            F.mse_loss,
            r"model's output \(\[5, 1\], \[5, 1\]\) .* fails: AttributeError: 'tuple' object",
        ),
        (
            fm.models.mlp((1, 8, 1)),
            lambda out, y: (out - y) ** 2,
            r"loss: <lambda>.* expected a 0-d floating tensor \(the mean over examples\), "
            r"got \[5, 1\]",
        ),
    ],
    ids=["mse-on-a-gaussian-head", "mse-on-a-tuple", "not-reduced"],
)
def test_a_loss_that_cannot_score_the_output_gives_its_reason_with_the_shapes(
    module, loss, message
):
    apply, params, buffers = fm.functionalize(module)
    with pytest.raises(ValueError, match=message):
        fm.maml_grad(params, regression_tasks(), apply=apply, buffers=buffers, loss=loss,
                     inner=fm.InnerLoop())  # fmt: skip


def test_the_loss_is_probed_once_per_code_not_once_per_lambda_object():
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 8, 2)))
    calls = []

    def run():
        def loss(output, y):  # a new function object every call, the same code
            calls.append(1)
            return gaussian_nll(output, y)

        fm.maml_grad(params, regression_tasks(), apply=apply, buffers=buffers, loss=loss,
                     inner=fm.InnerLoop(), batching=fm.Batching("loop"))  # fmt: skip

    run()
    first = len(calls)
    run()
    # The first call probes support and query (2 calls) on top of the step's own.
    assert first - (len(calls) - first) == 2
