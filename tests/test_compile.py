"""batching=COMPILE: the compiled meta-gradient equals eager vmap, is compiled once, and
falls back to eager when compiling fails."""

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta import batching
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
    monkeypatch.setattr(batching, "_COMPILE_FAILED", set())
    with pytest.warns(
        RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler\)"
    ):
        compiled, _ = fm.maml_grad(params, tasks, batching=COMPILE, **options)
    eager, _ = fm.maml_grad(params, tasks, batching=VMAP, **options)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered
        fm.maml_grad(params, tasks, batching=COMPILE, **options)
