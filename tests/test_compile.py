"""batching=COMPILE: the compiled meta-gradient equals eager vmap, is compiled once, and
falls back to eager when compiling fails."""

import warnings

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


def test_compiled_dropout_draws_per_task_and_repeats_from_a_seed():
    """Dropout compiles under vmap's randomness="different": the same generator gives the
    same meta-gradient, another seed another (inductor draws its own masks, so they are
    not eager vmap's numbers: the same distribution, as with the loop)."""
    from tests.test_dropout import dropout_mlp, options

    apply, params, buffers = fm.functionalize(dropout_mlp(0.5))
    tasks = sinusoid_tasks(4, 5, 5, generator=torch.Generator().manual_seed(2))
    settings = options(apply, buffers, COMPILE)

    def grads(seed):
        generator = torch.Generator().manual_seed(seed)
        return fm.maml_grad(params, tasks, generator=generator, **settings)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        first, again, other = grads(0), grads(0), grads(1)
    assert all(torch.equal(first[k], again[k]) for k in params)
    assert not torch.equal(first["head.weight"], other["head.weight"])
    assert all(bool(torch.isfinite(g).all()) for g in first.values())
