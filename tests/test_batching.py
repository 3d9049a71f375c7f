"""Strategy resolution (``"auto"``) and the two batch-norm paths (fused outside vmap,
primitives inside)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import functional_meta as fm
from functional_meta.autodiff import under_vmap
from functional_meta.batching import has_convolutions, resolve_strategy
from tests.reference import image_tasks, regression_tasks, tiny_conv4, tiny_mlp


def test_auto_runs_conv_nets_in_a_loop_on_cpu_and_everything_else_vmapped():
    conv, _, _ = fm.functionalize(tiny_conv4())
    mlp, _, _ = fm.functionalize(tiny_mlp())
    assert has_convolutions(conv) and not has_convolutions(mlp)
    assert not has_convolutions(lambda p, b, x: x)
    B = fm.Batching
    assert resolve_strategy(B(), model=conv, device="cpu") == B("loop")
    assert resolve_strategy(B("auto", 4), model=conv, device="cpu") == B("loop")
    assert resolve_strategy(B("auto", 4), model=mlp, device="cpu") == B("vmap", 4)
    assert resolve_strategy(B(), model=conv, device="cuda") == B("vmap")
    assert resolve_strategy(B("vmap", 2), model=conv, device="cpu") == B("vmap", 2)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        B("pmap")
    with pytest.raises(ValueError, match="chunk_size: expected None or an integer >= 1"):
        B("vmap", 0)


def test_forward_only_mapping_under_compile_is_eager_vmap():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    tasks = regression_tasks(num_tasks=3)

    def forward(p, task):
        return apply(p, buffers, task.query_x)

    compiled = fm.over_tasks(forward, fm.Batching("compile", 2))(params, tasks)
    assert torch.equal(compiled, fm.over_tasks(forward, fm.Batching("vmap", 2))(params, tasks))


def test_auto_is_the_default_of_the_steps_and_the_records():
    apply, params, buffers = fm.functionalize(tiny_conv4())
    assert fm.algorithms.maml(apply, F.cross_entropy).batching == fm.Batching("auto")
    tasks = image_tasks()
    common = dict(apply=apply, buffers=buffers, loss=F.cross_entropy, inner=fm.InnerLoop(lr=0.4))
    auto, _ = fm.maml_grad(params, tasks, **common)
    loop, _ = fm.maml_grad(params, tasks, batching=fm.Batching("loop"), **common)
    assert all(torch.equal(auto[k], loop[k]) for k in params)


def test_under_vmap_sees_every_level():
    seen = []

    def probe(x):
        seen.append(under_vmap())
        return x.sum()

    probe(torch.ones(2))
    grad(probe)(torch.ones(2))
    vmap(probe)(torch.ones(3, 2))
    vmap(grad(probe))(torch.ones(3, 2))
    grad(lambda x: vmap(probe)(x).sum())(torch.ones(3, 2))
    assert seen == [False, False, True, True, True]


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_batch_norm_paths_agree_in_value_and_second_order_gradient(mode):
    """The fused kernel (outside vmap) and the primitives (inside vmap) compute the same
    function, and second-order gradients through either agree in float64."""
    module = tiny_conv4(dtype=torch.float64)
    bn = module.features[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    apply, params, buffers = fm.functionalize(module, batch_norm=mode)
    x = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 5))

    def task_loss(p, x, y):
        inner = grad(lambda q: F.cross_entropy(apply(q, buffers, x), y))(p)
        adapted = {k: p[k] - 0.4 * inner[k] for k in p}
        return F.cross_entropy(apply(adapted, buffers, x), y)

    looped = [grad(task_loss)(params, x[i], y[i]) for i in range(2)]
    mapped = vmap(grad(task_loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        for k in params:
            torch.testing.assert_close(mapped[k][i], looped[i][k], rtol=1e-10, atol=1e-12)
    out_loop = torch.stack([apply(params, buffers, x[i]) for i in range(2)])
    out_vmap = vmap(apply, in_dims=(None, None, 0))(params, buffers, x)
    torch.testing.assert_close(out_vmap, out_loop, rtol=1e-12, atol=1e-12)
