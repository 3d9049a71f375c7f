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
    # Batched conv nets (on a GPU) get memory-bounded chunks unless a size is given.
    assert resolve_strategy(B(), model=conv, device="cuda") == B("vmap", "auto")
    assert resolve_strategy(B("auto", 4), model=conv, device="cuda") == B("vmap", 4)
    assert resolve_strategy(B(), model=mlp, device="cuda") == B("vmap")
    assert resolve_strategy(B("vmap", 2), model=conv, device="cpu") == B("vmap", 2)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        B("pmap")
    with pytest.raises(
        ValueError, match=r'chunk_size: expected None or an integer >= 1 \(or "auto"\), got 0'
    ):
        B("vmap", 0)
    with pytest.raises(ValueError, match="chunk_size: .* got 'big'"):
        B("vmap", "big")
    with pytest.raises(ValueError, match="Batching.memory_budget_mb: expected a positive"):
        B("vmap", "auto", memory_budget_mb=0)


def _conv_setup(steps=1):
    apply, params, buffers = fm.functionalize(tiny_conv4())
    common = dict(apply=apply, buffers=buffers, loss=F.cross_entropy,
                  inner=fm.InnerLoop(lr=0.4, steps=steps))  # fmt: skip
    return params, image_tasks(num_tasks=6), common


def test_auto_chunks_fit_the_memory_budget_and_keep_the_gradient(monkeypatch):
    params, tasks, common = _conv_setup()
    chosen = []
    choose = fm.batching.auto_chunk_size
    monkeypatch.setattr(
        fm.batching, "auto_chunk_size", lambda *a: chosen.append(choose(*a)) or chosen[-1]
    )
    whole, _ = fm.maml_grad(params, tasks, batching=fm.Batching("vmap"), **common)
    per_task = fm.memory.VMAP_FACTOR * fm.memory.task_bytes(
        lambda p, task: fm.losses.maml_loss(p, task, **common), params, tasks
    )
    assert per_task > 0
    for tasks_fitting, expected in ((6, 6), (4, 3), (2, 2), (0.5, 1)):  # budget -> chunk
        budget = fm.Batching("vmap", "auto", memory_budget_mb=tasks_fitting * per_task / 2**20)
        grads, _ = fm.maml_grad(params, tasks, batching=budget, **common)
        assert chosen[-1] == expected  # 4 fit: chunks of 3 (two even chunks, not 4 + 2)
        for name in params:
            torch.testing.assert_close(grads[name], whole[name], rtol=1e-5, atol=1e-6)


def test_the_memory_probe_runs_once_per_function_and_shapes_and_sees_the_settings(monkeypatch):
    params, tasks, common = _conv_setup()
    probes = []
    probe = fm.memory._probe
    monkeypatch.setattr(fm.memory, "_probe", lambda *a: probes.append(probe(*a)) or probes[-1])
    monkeypatch.setattr(fm.memory, "_ESTIMATES", type(fm.memory._ESTIMATES)())
    auto = fm.Batching("vmap", "auto")
    for _ in range(3):  # a fresh record and closure every call: probed once
        fm.maml_grad(params, tasks, batching=auto, **common)
    assert len(probes) == 1
    five = dict(common, inner=fm.InnerLoop(lr=0.4, steps=5))
    fm.maml_grad(params, tasks, batching=auto, **five)  # five inner steps hold more
    fm.maml_grad(params, image_tasks(num_tasks=6, shots=2), batching=auto, **common)
    assert len(probes) == 3 and probes[1] > probes[0] and probes[2] > probes[0]


def test_the_memory_probe_draws_no_random_number():
    torch.manual_seed(3)
    module = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    )
    apply, params, buffers = fm.functionalize(module)  # training mode: dropout draws
    tasks = regression_tasks(num_tasks=4)
    common = dict(apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(lr=0.1))
    fm.memory._ESTIMATES.clear()
    results = []
    for batching in (fm.Batching("vmap", "auto"), fm.Batching("vmap")):  # the same chunk
        torch.manual_seed(0)
        grads, _ = fm.maml_grad(params, tasks, batching=batching, **common)
        results.append((grads, torch.rand(3)))
    (probed, after_probe), (plain, after_plain) = results
    assert torch.equal(after_probe, after_plain)
    assert all(torch.equal(probed[k], plain[k]) for k in params)


def test_forward_only_mapping_under_compile_is_eager_vmap():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    tasks = regression_tasks(num_tasks=3)

    def forward(p, task):
        return apply(p, buffers, task.query_x)

    compiled = fm.over_tasks(forward, fm.Batching("compile", 2))(params, tasks)
    assert torch.equal(compiled, fm.over_tasks(forward, fm.Batching("vmap", 2))(params, tasks))
    tight = fm.Batching("vmap", "auto", memory_budget_mb=1e-6)  # one task per chunk
    torch.testing.assert_close(fm.over_tasks(forward, tight)(params, tasks), compiled)


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
