"""What a meta-step does besides its arithmetic: host reads (synchronisations on a GPU)
are folded into one per check, settings are validated once per record, and the fused
finite checks still refuse what the per-tensor ones refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.validation import all_finite
from tests.reference import regression_tasks, tiny_mlp

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a tensor's value into Python."""
    counted = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            counted.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counted


def _setup():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    options = dict(apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(lr=0.1),
                   batching=fm.Batching("vmap"))  # fmt: skip
    return params, regression_tasks(num_tasks=4), options


def test_a_meta_step_reads_the_device_three_times(host_reads):
    params, tasks, options = _setup()
    opt = fm.optim.adam(1e-3)
    state = opt.init(params)
    weights = torch.ones(1)  # validated (read) when the record is built
    params, state, _ = fm.maml_step(params, state, tasks, optimizer=opt, step_weights=weights,
                                    **options)  # fmt: skip
    host_reads.clear()
    _, _, metrics = fm.maml_step(params, state, tasks, optimizer=opt, step_weights=weights,
                                 **options)  # fmt: skip
    # The finite check and every metric in one read, the update's finite check, and
    # Adam's step count (a CPU tensor). The record, and the check of its step weights, is
    # reused from the first call.
    assert sorted(host_reads) == ["__bool__", "__int__", "tolist"]
    assert isinstance(metrics["loss"], float) and isinstance(metrics["query_loss"], float)
    assert len(metrics["support_losses"]) == 1 and isinstance(metrics["support_losses"][0], float)


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "mamlpp", "reptile"])
def test_every_algorithm_reads_the_device_three_times_per_step(host_reads, name):
    params, tasks, options = _setup()
    inner = fm.InnerLoop(lr=0.1, steps=2)
    if name == "anil":  # the last layer adapts
        head = sorted(params)[-1].rsplit(".", 1)[0]
        inner = fm.InnerLoop(lr=0.1, adapted=lambda n: n.startswith(head))
    elif name == "metasgd":  # learned rates, no fixed one
        inner = fm.InnerLoop(steps=2)
    algorithm = fm.algorithms.REGISTRY[name](options["apply"], F.mse_loss, inner,
                                              batching=fm.Batching("vmap"))  # fmt: skip
    opt = fm.optim.adam(1e-3)
    state = fm.init_state(algorithm, params, options["buffers"], opt)
    state, _ = fm.step(algorithm, state, tasks, opt)
    host_reads.clear()
    fm.step(algorithm, state, tasks, opt)
    assert sorted(host_reads) == ["__bool__", "__int__", "tolist"]


def test_metrics_are_the_means_over_tasks():
    params, tasks, options = _setup()
    algorithm = fm.algorithms.maml(
        options["apply"], F.mse_loss, options["inner"], batching=fm.Batching("vmap")
    )
    gradient = algorithm.grad({"params": params}, options["buffers"], tasks)
    losses, aux = [], []
    for i in range(len(tasks)):
        single = algorithm.grad({"params": params}, options["buffers"], tasks[i : i + 1])
        losses.append(single.metrics["loss"])
        aux.append(single.metrics["support_losses"][0])
    assert gradient.metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert gradient.metrics["support_losses"][0] == pytest.approx(sum(aux) / len(aux), rel=1e-6)


def test_one_read_checks_losses_and_gradients_and_names_the_culprit():
    losses, aux = torch.tensor([1.0, 3.0]), {"support_losses": torch.tensor([[2.0], [4.0]])}
    grads = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    metrics = fm.steps.summarize(losses, aux, check=grads)
    assert metrics == {"loss": 2.0, "support_losses": [3.0]}
    grads["b"][1] = float("inf")
    with pytest.raises(fm.NonFiniteError, match="non-finite meta-gradient"):
        fm.steps.summarize(losses, aux, check=grads)
    with pytest.raises(fm.NonFiniteError, match="non-finite meta-loss"):
        fm.steps.summarize(torch.tensor([1.0, float("nan")]), aux, check={"w": torch.ones(2)})


def test_an_update_that_overflows_is_refused():
    params, tasks, options = _setup()

    def update(grads, state, params):
        return {k: torch.full_like(g, float("inf")) for k, g in grads.items()}, state

    exploding = fm.optim.GradientTransformation(lambda params: {}, update)
    with pytest.raises(fm.NonFiniteError, match="the optimizer update made meta-parameters NaN"):
        fm.maml_step(params, {}, tasks, optimizer=exploding, **options)


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
def test_the_fused_finite_check_finds_one_bad_entry_among_any_leaves(bad):
    leaves = {
        "big": torch.randn(300, 300),
        "half": torch.randn(5).half(),
        "double": torch.randn(2, 3, dtype=torch.float64),
        "ints": torch.arange(4),
        "empty": torch.zeros(0),
    }
    assert all_finite(leaves) and all_finite() and all_finite({"ints": torch.arange(3)})
    for name in ("big", "half", "double"):
        broken = dict(leaves)
        broken[name] = leaves[name].clone()
        broken[name].view(-1)[-1] = bad
        assert not all_finite(broken), name
