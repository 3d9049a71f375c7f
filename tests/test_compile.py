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
    generator = torch.Generator().manual_seed(2)
    meta, state = dict(params), optimizer.init(params)
    for _ in range(steps):
        tasks = sinusoid_tasks(6, 5, 5, generator=generator)
        meta, state, _ = fm.maml_step(
            meta, state, tasks, optimizer=optimizer, batching=batching, **options
        )
    return meta, state


def test_the_compiled_meta_update_equals_eager_and_is_not_recompiled_as_the_count_grows():
    """The update (Adam, whose bias corrections read the update count) is its own graph,
    made once: two graphs per step, the meta-gradient's and the update's, for all steps."""
    params, options = setup()
    optimizer = fm.optim.adam(1e-2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiled whole: no eager fallback
        steps_of(optimizer, COMPILE, params, options, steps=1)  # compiles both graphs
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled, state = steps_of(optimizer, COMPILE, params, options)
    eager, eager_state = steps_of(optimizer, VMAP, params, options)
    assert int(state["count"]) == int(eager_state["count"]) == 4
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)


def test_a_meta_update_that_reads_its_count_runs_eagerly_after_one_warning(monkeypatch):
    """An update that does not trace as one graph (cosine_decay's Python arithmetic on the
    update count) runs eagerly after one warning, with the same result."""
    params, options = setup()
    monkeypatch.setattr(compiling, "_COMPILE_FAILED", set())
    optimizer = fm.optim.adam(fm.optim.cosine_decay(1e-2, 10))
    with pytest.warns(RuntimeWarning, match="running the meta-update eagerly"):
        compiled, _ = steps_of(optimizer, COMPILE, params, options, steps=2)
    eager, _ = steps_of(optimizer, VMAP, params, options, steps=2)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
