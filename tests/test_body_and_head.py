"""ANIL runs the body once per task and input: the same gradients and predictions as the
whole model at every inner step, with fewer body passes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import functional_meta as fm
from functional_meta.algorithms.maml import gradient_based
from functional_meta.body_and_head import split_head
from tests.reference import image_tasks, tiny_conv4
from tests.test_maml_parity import STRATEGIES, assert_trees_close

F64 = torch.float64


def is_head(name: str) -> bool:
    return name.startswith("head.")


def whole_model_anil(apply, inner, batching=fm.Batching()):
    """ANIL as it ran before the split: the whole model at every inner step."""
    return gradient_based("anil", apply, F.cross_entropy, replace(inner, adapted=is_head),
                          batching)  # fmt: skip


class CountConvolutions(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_split_anil_equals_the_whole_model_anil(first_order):
    apply, params, buffers = fm.functionalize(tiny_conv4(dtype=F64))
    assert split_head(apply, "head.") is not None
    tasks = image_tasks(dtype=F64)
    inner = fm.InnerLoop(lr=0.4, steps=3, first_order=first_order)
    for batching in STRATEGIES:
        split = fm.algorithms.anil(apply, F.cross_entropy, inner, batching=batching)
        whole = whole_model_anil(apply, inner, batching)
        got = split.grad({"params": params}, buffers, tasks)
        want = whole.grad({"params": params}, buffers, tasks)
        assert_trees_close(got.grads["params"], want.grads["params"], F64)
        assert got.metrics["loss"] == pytest.approx(want.metrics["loss"], rel=1e-12)


def test_split_anil_adapts_and_predicts_as_the_whole_model():
    apply, params, buffers = fm.functionalize(tiny_conv4(dtype=F64))
    tasks = image_tasks(dtype=F64)
    inner = fm.InnerLoop(lr=0.4, steps=1)
    split = fm.algorithms.anil(apply, F.cross_entropy, inner)
    whole = whole_model_anil(apply, inner)
    meta = {"params": params}
    x, y = tasks.support_x[0], tasks.support_y[0]
    got = split.adapt(meta, buffers, x, y, steps=5)
    want = whole.adapt(meta, buffers, x, y, steps=5)
    assert set(got.params) == set(params)
    assert_trees_close(got.params, want.params, F64)
    torch.testing.assert_close(split.predict(got, tasks.query_x[0]),
                               whole.predict(want, tasks.query_x[0]))  # fmt: skip
    assert not torch.equal(got.params["head.weight"], params["head.weight"])
    assert all(got.params[k] is params[k] for k in params if not is_head(k))


def test_the_body_runs_once_per_task_and_input():
    apply, params, buffers = fm.functionalize(tiny_conv4())
    tasks = image_tasks()
    inner = fm.InnerLoop(lr=0.4, steps=3, first_order=True)
    layers = 4
    counts = {}
    for name, record in [("split", fm.algorithms.anil(apply, F.cross_entropy, inner,
                                                      batching=fm.Batching("loop"))),
                         ("whole", whole_model_anil(apply, inner, fm.Batching("loop")))]:  # fmt: skip
        record.grad({"params": params}, buffers, tasks)  # first-call checks run here
        with CountConvolutions() as count:
            record.grad({"params": params}, buffers, tasks)
        counts[name] = count.forward
    # support once and query once; the whole model runs the support at every inner step
    assert counts["split"] == len(tasks) * 2 * layers
    assert counts["whole"] == len(tasks) * (inner.steps + 1) * layers


class HeadFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.body = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(self.head(x))


def test_models_that_are_not_head_of_body_run_whole():
    assert split_head(fm.functionalize(tiny_conv4())[0], "head.") is not None
    assert split_head(fm.functionalize(fm.models.mlp())[0], "head.") is not None
    # not a Sequential, the head not last, a prefix wider than the head, dropout drawing
    assert split_head(fm.functionalize(HeadFirst())[0], "head.") is None
    reordered = nn.Sequential()
    reordered.add_module("head", nn.Linear(2, 2))
    reordered.add_module("body", nn.Linear(2, 2))
    assert split_head(fm.functionalize(reordered)[0], "head.") is None
    wide = nn.Sequential()
    wide.add_module("header", nn.Linear(2, 2))
    wide.add_module("head", nn.Linear(2, 2))
    assert split_head(fm.functionalize(wide)[0], "head") is None
    assert split_head(fm.functionalize(wide)[0], "head.") is not None
    dropping = nn.Sequential()
    dropping.add_module("body", nn.Dropout(0.5))
    dropping.add_module("head", nn.Linear(2, 2))
    assert split_head(fm.functionalize(dropping.train())[0], "head.") is None
    assert split_head(lambda p, b, x: x, "head.") is None


def test_learned_rates_are_refused_with_a_split_model():
    apply, params, buffers = fm.functionalize(tiny_conv4())
    split = split_head(apply, "head.")
    inner = fm.InnerLoop(lr=0.4, adapted=is_head)
    record = gradient_based("x", apply, F.cross_entropy, inner, fm.Batching("loop"),
                            rates=lambda meta: {"head.weight": torch.tensor(0.1)},
                            body_and_head=split)  # fmt: skip
    with pytest.raises(ValueError, match="body_and_head: the split runs the head with inner.lr"):
        record.grad({"params": params}, buffers, image_tasks())
