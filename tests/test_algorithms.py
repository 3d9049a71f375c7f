"""Meta-SGD, ANIL, Reptile and MAML++: every strategy equals a hand-written reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.algorithms.mamlpp import PerStage, per_stage_names
from functional_meta.algorithms.reptile import reptile_minibatches
from tests.reference import (
    image_tasks,
    reference_maml_grad,
    regression_tasks,
    tiny_conv4,
    tiny_mlp,
)
from tests.test_maml_parity import STRATEGIES, assert_trees_close

F64 = torch.float64


# -- Meta-SGD ---------------------------------------------------------------------------
@pytest.mark.parametrize("per_step", [False, True], ids=["shared-rates", "per-step-rates"])
def test_metasgd_gradients_for_params_and_rates_equal_the_reference(per_step):
    module = tiny_mlp(F64)
    apply, params, buffers = fm.functionalize(module)
    tasks = regression_tasks(dtype=F64)
    meta = fm.metasgd_init(params, 0.05, steps=2 if per_step else None)
    g = torch.Generator().manual_seed(3)
    # Distinct rates per weight, so the test sees that each weight uses its own.
    meta["inner_lr"] = {
        k: v * (0.5 + torch.rand(v.shape, generator=g, dtype=F64))
        for k, v in meta["inner_lr"].items()
    }
    expected, expected_lr = reference_maml_grad(
        module, params, tasks, F.mse_loss, meta["inner_lr"], inner_steps=2, per_step_lr=per_step
    )
    for batching in STRATEGIES:
        grads, _ = fm.metasgd_grad(
            meta, tasks, apply=apply, buffers=buffers, loss=F.mse_loss,
            inner=fm.InnerLoop(steps=2), per_step_rates=per_step, batching=batching,
        )  # fmt: skip
        assert_trees_close(grads["params"], expected, F64)
        assert_trees_close(grads["inner_lr"], expected_lr, F64)


def test_metasgd_rates_change_during_training():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    meta = fm.metasgd_init(params, 0.05)
    opt = fm.optim.adam(1e-2)
    state = opt.init(meta)
    g = torch.Generator().manual_seed(0)
    start = {k: v.clone() for k, v in meta["inner_lr"].items()}
    for _ in range(3):
        meta, state, _ = fm.metasgd_step(
            meta, state, fm.data.sinusoid_tasks(8, generator=g),
            optimizer=opt, apply=apply, buffers=buffers, loss=F.mse_loss, inner=fm.InnerLoop(),
        )  # fmt: skip
    for name in start:
        assert not torch.equal(meta["inner_lr"][name], start[name]), name


# -- ANIL -------------------------------------------------------------------------------
def is_head(name: str) -> bool:
    return name.startswith("head.")


def test_anil_outer_gradients_equal_the_reference_on_conv4():
    module = tiny_conv4(dtype=F64)
    apply, params, buffers = fm.functionalize(module)
    tasks = image_tasks(dtype=F64)
    head = {k for k in params if is_head(k)}
    expected, _ = reference_maml_grad(
        module, params, tasks, F.cross_entropy, 0.4, inner_steps=2, adapted=head
    )
    anil = fm.algorithms.anil(apply, F.cross_entropy, fm.InnerLoop(lr=0.4, steps=2))
    for batching in STRATEGIES:
        grads, _ = fm.maml_grad(
            params, tasks, apply=apply, buffers=buffers, loss=F.cross_entropy,
            inner=fm.InnerLoop(lr=0.4, steps=2, adapted=is_head), batching=batching,
        )  # fmt: skip
        assert_trees_close(grads, expected, F64)
        gradient = anil._replace(batching=batching).grad({"params": params}, buffers, tasks)
        grads = gradient.grads["params"]
        assert_trees_close(grads, expected, F64)
        assert all(float(grads[k].abs().max()) > 0 for k in params if not is_head(k)), (
            "the body is meta-learned"
        )


# -- Reptile ----------------------------------------------------------------------------
def reference_reptile(module, params, tasks, inner_lr, inner_steps, meta_lr, minibatches=None):
    """The plain algorithm: a deep-copied model per task, torch.optim.SGD, one task at a time."""
    module = copy.deepcopy(module)
    module.load_state_dict(params, strict=False)
    adapted = []
    for i in range(len(tasks)):
        sx, sy, qx, qy = tasks[i]
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        clone = copy.deepcopy(module).train()
        sgd = torch.optim.SGD(clone.parameters(), lr=inner_lr)
        for t in range(inner_steps):
            idx = slice(None) if minibatches is None else minibatches[t]
            sgd.zero_grad()
            F.mse_loss(clone(x[idx]), y[idx]).backward()
            sgd.step()
        adapted.append(dict(clone.named_parameters()))
    return {
        k: v + meta_lr * (torch.stack([a[k].detach() for a in adapted]).mean(0) - v)
        for k, v in params.items()
    }


@pytest.mark.parametrize("batch_size", [None, 6], ids=["full-batch", "minibatch"])
def test_reptile_step_equals_the_plain_reference(batch_size):
    module = tiny_mlp()
    apply, params, buffers = fm.functionalize(module)
    tasks = regression_tasks()
    minibatches = None
    if batch_size:
        minibatches = reptile_minibatches(12, 4, batch_size, torch.Generator().manual_seed(5))
    expected = reference_reptile(module, params, tasks, 0.02, 4, 0.5, minibatches)
    opt = fm.optim.sgd(0.5)
    for batching in STRATEGIES:
        new_params, _, metrics = fm.reptile_step(
            params, opt.init(params), tasks, optimizer=opt, apply=apply, buffers=buffers,
            loss=F.mse_loss, inner=fm.InnerLoop(lr=0.02, steps=4), batch_size=batch_size,
            generator=torch.Generator().manual_seed(5), batching=batching,
        )  # fmt: skip
        assert_trees_close(new_params, expected, torch.float32)
        assert len(metrics["support_losses"]) == 4


def test_reptile_builds_no_graph_and_memory_does_not_grow_with_steps():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    params = {k: v.requires_grad_() for k, v in params.items()}
    grads, _ = fm.reptile_grad(
        params,
        regression_tasks(),
        apply=apply,
        buffers=buffers,
        loss=F.mse_loss,
        inner=fm.InnerLoop(lr=0.02, steps=50),
    )
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())


# -- MAML++ -----------------------------------------------------------------------------


PLAIN = dict(
    multi_step_loss=False, learn_inner_lr=False, per_step_bn_weights=False, per_step_bn_stats=False
)


def mamlpp(apply, lr=0.4, batching=fm.Batching(), **switches):
    inner = fm.InnerLoop(lr=lr, steps=2)
    return fm.algorithms.mamlpp(apply, F.cross_entropy, inner, batching=batching, **switches)


@pytest.mark.parametrize("epoch, first_order", [(0.0, True), (4.9, True), (5.0, False)])
def test_derivative_order_annealing_switches_from_first_to_second_order(epoch, first_order):
    apply, params, buffers = fm.functionalize(tiny_conv4(dtype=F64))
    tasks = image_tasks(dtype=F64)
    algorithm = mamlpp(apply, first_order_epochs=5.0, **PLAIN)
    meta, bufs = algorithm.init(params, buffers)
    grads, metrics, stats = algorithm.grad(meta, bufs, tasks, epoch=epoch)
    expected, _ = fm.maml_grad(
        params, tasks, apply=apply, buffers=buffers, loss=F.cross_entropy,
        inner=fm.InnerLoop(lr=0.4, steps=2, first_order=first_order),
    )  # fmt: skip
    assert_trees_close(grads["params"], expected, F64)
    assert metrics["first_order"] == float(first_order) and stats is None


def test_lslr_rates_get_the_reference_gradient_and_move():
    module = tiny_conv4(dtype=F64)
    apply, params, buffers = fm.functionalize(module)
    tasks = image_tasks(dtype=F64)
    switches = dict(PLAIN, first_order_epochs=0.0, learn_inner_lr=True, multi_step_loss=True)
    meta, bufs = mamlpp(apply, lr=0.3, **switches).init(params, buffers)
    meta["inner_lr"] = {
        k: v * torch.tensor([1.0, 0.5], dtype=F64) for k, v in meta["inner_lr"].items()
    }
    weights = fm.msl_weights(3.0, 2, 10.0).to(F64)
    expected, expected_lr = reference_maml_grad(
        module,
        params,
        tasks,
        F.cross_entropy,
        meta["inner_lr"],
        inner_steps=2,
        per_step_lr=True,
        step_weights=weights,
    )
    for batching in STRATEGIES:
        algorithm = mamlpp(apply, lr=0.3, batching=batching, **switches)
        grads, _, _ = algorithm.grad(meta, bufs, tasks, epoch=3.0)
        assert_trees_close(grads["params"], expected, F64)
        assert_trees_close(grads["inner_lr"], expected_lr, F64)
    opt = fm.optim.adam(1e-2)
    moved, _, _, _ = fm.mamlpp_step(
        meta, opt.init(meta), bufs, tasks, optimizer=opt, apply=apply, loss=F.cross_entropy,
        epoch=3.0, inner=fm.InnerLoop(lr=0.3, steps=2), **switches,
    )  # fmt: skip
    # (The rates of conv biases that feed a batch norm get no gradient: BN cancels those biases.)
    for name in ("features.0.weight", "features.1.weight", "head.weight", "head.bias"):
        assert (moved["inner_lr"][name] != meta["inner_lr"][name]).all(), name


def test_per_step_bn_weights_split_the_shared_gradient_across_stages():
    """At initialisation every stage holds the same BN weights, so the per-stage gradients
    (BNWB) must add up to the gradient of one shared BN weight."""
    apply, params, buffers = fm.functionalize(tiny_conv4(dtype=F64))
    tasks = image_tasks(dtype=F64)
    shared = mamlpp(apply, first_order_epochs=0.0, **PLAIN)
    staged = mamlpp(apply, first_order_epochs=0.0, **{**PLAIN, "per_step_bn_weights": True})
    meta_shared, bufs = shared.init(params, buffers)
    meta_staged, _ = staged.init(params, buffers)
    names = per_stage_names(apply, per_step_bn_weights=True, per_step_bn_stats=False)
    assert names and all(meta_staged["params"][n].shape[0] == 3 for n in names)
    g_shared = shared.grad(meta_shared, bufs, tasks, epoch=1.0).grads
    # BN weights are not adapted under BNWB, so compare with a shared run that does not adapt them either.
    expected, _ = fm.maml_grad(
        params, tasks, apply=apply, buffers=buffers, loss=F.cross_entropy,
        inner=fm.InnerLoop(lr=0.4, steps=2, adapted=lambda n: n not in names),
    )  # fmt: skip
    g_staged = staged.grad(meta_staged, bufs, tasks, epoch=1.0).grads
    summed = {k: v.sum(0) if k in names else v for k, v in g_staged["params"].items()}
    assert_trees_close(summed, expected, F64)
    assert g_shared["params"].keys() == summed.keys()


def test_per_step_running_statistics_are_collected_and_used_at_evaluation():
    apply, params, buffers = fm.functionalize(tiny_conv4())
    tasks = image_tasks(num_tasks=4)
    opt = fm.optim.adam(1e-3)
    state = fm.init_state(mamlpp(apply), params, buffers, opt)
    before = {k: v.clone() for k, v in state.buffers.items()}
    for batching in (fm.Batching("vmap"), fm.Batching("loop")):
        new_state, _ = fm.step(mamlpp(apply, batching=batching), state, tasks, opt, epoch=0.0)
        if batching.strategy == "vmap":
            reference = new_state.buffers
        else:
            assert_trees_close(
                {k: v.double() for k, v in new_state.buffers.items()},
                {k: v.double() for k, v in reference.items()},
                torch.float32,
            )
    assert all(torch.equal(state.buffers[k], before[k]) for k in before), (
        "buffers are not written in place"
    )
    name = "features.1.running_mean"
    assert reference[name].shape == (3, 8)
    assert all(not torch.equal(reference[name][s], before[name][s]) for s in range(3))
    assert int(reference["features.1.num_batches_tracked"]) == 1

    # With BNRS, a query prediction depends on its own example and the support set only.
    meta = new_state.meta_params
    task = tasks[0]
    others = torch.rand_like(task.query_x[1:]) * 5

    def first_logits(algorithm):
        adapted = algorithm.adapt(meta, new_state.buffers, task.support_x, task.support_y)
        return [
            algorithm.predict(adapted, q)[0]
            for q in (task.query_x, torch.cat([task.query_x[:1], others]))
        ]

    torch.testing.assert_close(*first_logits(mamlpp(apply, eval_running_stats=True)))
    assert not torch.allclose(*first_logits(mamlpp(apply))), (
        "by default (batch statistics, as the authors' code) the other query examples matter"
    )
    result = fm.evaluate(mamlpp(apply), new_state, tasks)
    assert result.num_tasks == 4 and result.accuracy is not None


def test_multi_step_loss_ends_after_its_anneal_epochs():
    """As in the authors' code: MSL for epochs < msl_anneal_epochs, then the last step alone."""
    module = tiny_conv4(dtype=F64)
    apply, params, buffers = fm.functionalize(module)
    tasks = image_tasks(dtype=F64)
    algorithm = mamlpp(
        apply, first_order_epochs=0.0, msl_anneal_epochs=2.0, **{**PLAIN, "multi_step_loss": True}
    )
    meta, bufs = algorithm.init(params, buffers)
    for epoch, weights in ((1.5, fm.msl_weights(1.5, 2, 2.0).to(F64)), (2.0, None)):
        expected, _ = reference_maml_grad(
            module, params, tasks, F.cross_entropy, 0.4, inner_steps=2, step_weights=weights
        )
        grads = algorithm.grad(meta, bufs, tasks, epoch=epoch).grads
        assert_trees_close(grads["params"], expected, F64)


def test_per_step_batch_statistics_are_those_of_each_stage_forward():
    """BNRS stage s: the support forward at θ_s (s < k), the query forward at θ_k (s = k),
    checked against nn.BatchNorm2d inputs seen by hooks on a plain module."""
    module = tiny_conv4(dtype=F64)
    apply, params, buffers = fm.functionalize(module)
    tasks = image_tasks(dtype=F64)
    switches = dict(PLAIN, first_order_epochs=0.0, per_step_bn_stats=True)
    meta, bufs = mamlpp(apply, **switches).init(params, buffers)
    layers = [n for n, m in module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {}
    for name in layers:
        module.get_submodule(name).register_forward_pre_hook(
            lambda _, inputs, name=name: seen.__setitem__(
                name, (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=True))
            )
        )
    expected = {name: ([], []) for name in layers}
    for task in tasks:
        for stage, x in ((0, task.support_x), (1, task.support_x), (2, task.query_x)):
            theta = fm.adapt(
                apply, params, buffers, task.support_x, task.support_y, F.cross_entropy,
                fm.InnerLoop(lr=0.4, steps=stage),
            ).params if stage else params  # fmt: skip
            torch.func.functional_call(module, theta, (x,))
            for name in layers:
                expected[name][0].append(seen[name][0])
                expected[name][1].append(seen[name][1])
    for batching in STRATEGIES:
        stats = mamlpp(apply, batching=batching, **switches).grad(meta, bufs, tasks).statistics
        for name in layers:
            for got, values in zip(stats[name], expected[name], strict=True):
                reference = torch.stack(values).reshape(len(tasks), 3, -1).mean(0)
                torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)


def test_per_stage_forward_slices_each_staged_tensor():
    hook = PerStage(frozenset({"a"}))
    tensors = {"a": torch.arange(3.0), "b": torch.tensor(7.0)}
    assert hook.at(tensors, 1) == {"a": torch.tensor(1.0), "b": torch.tensor(7.0)}
    assert hook.at(tensors, 9)["a"] == 2.0, "beyond the last stage: the last slice"


def test_inner_clipping_clips_each_inner_gradient():
    apply, params, buffers = fm.functionalize(tiny_mlp(F64))
    task = regression_tasks(dtype=F64)[0]
    clipped = fm.adapt(
        apply, params, buffers, task.support_x, task.support_y, F.mse_loss,
        fm.InnerLoop(lr=1.0, steps=1, clip=0.01),
    )  # fmt: skip
    grads = torch.func.grad(
        lambda p: F.mse_loss(apply(p, buffers, task.support_x), task.support_y)
    )(params)
    norm = fm.tree.global_norm(grads)
    assert norm > 0.01
    for k in params:
        torch.testing.assert_close(clipped.params[k], params[k] - grads[k] * 0.01 / (norm + 1e-6))
