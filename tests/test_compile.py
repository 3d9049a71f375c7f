"""batching=COMPILE: the compiled meta-gradient and meta-update equal eager vmap, are compiled
once, and fall back to eager when compiling fails."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta import compiling
from functional_meta.data import sinusoid_tasks

pytest.importorskip("torch._dynamo")
COMPILE, VMAP = fm.Batching("compile"), fm.Batching("vmap")


def setup():
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 16, 16, 1)))
    options = dict(apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(steps=2))
    return params, options


def test_compiled_meta_gradient_equals_eager_vmap_and_compiles_once():
    params, options = setup()
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # new tasks each step: the same graph
            tasks = sinusoid_tasks(6, 5, 5, generator=generator)
            compiled, metrics = fm.maml_grad(params, tasks, batching=COMPILE, **options)
            eager, expected = fm.maml_grad(params, tasks, batching=VMAP, **options)
            for name in eager:
                torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
            assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch):
    params, options = setup()
    tasks = sinusoid_tasks(4, 5, 5, generator=torch.Generator().manual_seed(1))

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiling, "_COMPILE_FAILED", set())
    with pytest.warns(
        RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler\)"
    ):
        compiled, _ = fm.maml_grad(params, tasks, batching=COMPILE, **options)
    eager, _ = fm.maml_grad(params, tasks, batching=VMAP, **options)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered
        fm.maml_grad(params, tasks, batching=COMPILE, **options)


def steps_of(optimizer, batching, params, options, steps=4):
    """``steps`` maml_steps on fresh sinusoid tasks: (params, opt_state, metrics of each)."""
    generator = torch.Generator().manual_seed(2)
    meta, state, metrics = dict(params), optimizer.init(params), []
    for _ in range(steps):
        tasks = sinusoid_tasks(6, 5, 5, generator=generator)
        meta, state, m = fm.maml_step(
            meta, state, tasks, optimizer=optimizer, batching=batching, **options
        )
        metrics.append(m)
    return meta, state, metrics


def compiled_graphs(run):
    """``run()`` from a clean dynamo cache, with no eager fallback allowed: the number of
    graphs its first call compiles, and its result on later calls without a recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiled whole: no eager fallback
        run(1)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            return graphs, run(4)


def assert_same_steps(compiled, eager):
    (params, state, metrics), (eager_params, eager_state, eager_metrics) = compiled, eager
    assert int(state["count"]) == int(eager_state["count"])
    for name in eager_params:
        torch.testing.assert_close(params[name], eager_params[name], rtol=1e-4, atol=1e-6)
    for got, expected in zip(metrics, eager_metrics, strict=True):
        assert got.keys() == expected.keys()
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_a_compiled_maml_step_is_one_graph_made_once_and_equals_eager():
    """Gradient, metrics, finite checks and the Adam update (whose bias corrections read
    the update count) in one graph, not recompiled as the count grows."""
    params, options = setup()
    optimizer = fm.optim.adam(1e-2)
    graphs, compiled = compiled_graphs(lambda n: steps_of(optimizer, COMPILE, params, options, n))
    assert graphs == 1
    assert_same_steps(compiled, steps_of(optimizer, VMAP, params, options))


def test_in_chunks_the_meta_update_is_its_own_graph_made_once():
    """With chunks the gradient is accumulated between graphs: one graph for a chunk's
    gradient (the same for both chunks) and one for the update."""
    params, options = setup()
    optimizer = fm.optim.adam(1e-2)
    chunked = fm.Batching("compile", 3)
    graphs, compiled = compiled_graphs(lambda n: steps_of(optimizer, chunked, params, options, n))
    assert graphs == 2
    assert_same_steps(compiled, steps_of(optimizer, VMAP, params, options))


@pytest.mark.parametrize("name", ["maml", "metasgd", "protonets", "anil"])
def test_a_compiled_step_of_every_loss_gradient_algorithm_equals_eager(name):
    torch.manual_seed(0)
    net = fm.models.mlp((1, 16, 16, 1))
    apply, params, buffers = fm.functionalize(net)
    build = {"maml": lambda b: fm.algorithms.maml(apply, F.mse_loss, fm.InnerLoop(steps=2), batching=b),
             "metasgd": lambda b: fm.algorithms.metasgd(apply, F.mse_loss, fm.InnerLoop(steps=2), batching=b),
             "anil": lambda b: fm.algorithms.anil(apply, F.mse_loss, fm.InnerLoop(steps=2), batching=b),
             "protonets": lambda b: fm.algorithms.protonets(apply, F.cross_entropy, batching=b)}[name]  # fmt: skip
    optimizer = fm.optim.sgd(0.1)  # linear in the gradient: Adam would amplify float noise
    results = []  # where a gradient entry is near zero (ProtoNets' unused units)
    for batching in (COMPILE, VMAP):
        algorithm = build(batching)
        state = fm.init_state(algorithm, params, buffers, optimizer)
        generator = torch.Generator().manual_seed(3)
        for _ in range(2):
            tasks = (classification_tasks(generator) if name == "protonets"
                     else sinusoid_tasks(6, 5, 5, generator=generator))  # fmt: skip
            state, metrics = fm.step(algorithm, state, tasks, optimizer)
        results.append((state, metrics))
    (compiled, metrics), (eager, expected) = results
    assert metrics.keys() == expected.keys()
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    for got, want in zip(fm.tree.leaves(compiled.meta_params), fm.tree.leaves(eager.meta_params),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def classification_tasks(generator):
    """Two-way tasks on one input feature, for Prototypical Networks on the test MLP."""
    labels = torch.tensor([0, 1, 0, 1])
    x = torch.randn(6, 4, 1, generator=generator) + labels.view(1, 4, 1) * 3
    return fm.TaskBatch(x, labels.expand(6, 4), x + 0.1, labels.expand(6, 4))


def test_a_compiled_step_refuses_a_non_finite_loss_and_updates_nothing():
    params, options = setup()
    optimizer = fm.optim.adam(1e-2)
    tasks = sinusoid_tasks(6, 5, 5, generator=torch.Generator().manual_seed(4))
    bad = fm.TaskBatch(tasks.support_x, tasks.support_y, tasks.query_x.clone(), tasks.query_y)
    bad.query_x[2, 0] = float("nan")
    state = optimizer.init(params)
    with pytest.raises(fm.validation.NonFiniteError, match="non-finite meta-loss"):
        fm.maml_step(params, state, bad, optimizer=optimizer, batching=COMPILE, **options)
    assert int(state["count"]) == 0  # nothing given is modified


def test_a_meta_update_that_reads_its_count_runs_eagerly_after_one_warning(monkeypatch):
    """A step that does not trace as one graph (cosine_decay's Python arithmetic on the
    update count) runs eagerly after one warning, with the same result."""
    params, options = setup()
    monkeypatch.setattr(compiling, "_COMPILE_FAILED", set())
    optimizer = fm.optim.adam(fm.optim.cosine_decay(1e-2, 10))
    with pytest.warns(RuntimeWarning, match="running the meta-update eagerly"):
        compiled = steps_of(optimizer, COMPILE, params, options, steps=2)
    assert_same_steps(compiled, steps_of(optimizer, VMAP, params, options, steps=2))
