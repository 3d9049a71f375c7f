"""Export: the exported nn.Module reproduces the library's own predictions, for MAML (conv
net with batch norm), Meta-SGD, Reptile, MAML++ (per-stage batch norm) and iMAML."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functional_meta as fm
from functional_meta.export import adapted_module, to_module
from tests.reference import image_tasks, regression_tasks, tiny_conv4, tiny_mlp


def trained(name, module, loss, steps=2):
    tasks = image_tasks if loss is F.cross_entropy else regression_tasks
    apply, params, buffers = fm.functionalize(module)
    algorithm = fm.algorithms.build(name, apply, loss, fm.InnerLoop(lr=0.1, steps=steps))
    opt = fm.optim.adam(1e-2)
    state = fm.init_state(algorithm, params, buffers, opt)
    for i in range(3):
        state, _ = fm.step(algorithm, state, tasks(seed=i), opt, epoch=float(i))
    return algorithm, state


@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile", "mamlpp", "imaml"])
def test_an_adapted_module_reproduces_the_librarys_predictions(name):
    module = tiny_conv4()
    algorithm, state = trained(name, module, F.cross_entropy)
    task = image_tasks(seed=9)[0]
    with torch.no_grad():
        adapted = algorithm.adapt(state.meta_params, state.buffers, task.support_x, task.support_y)
        expected = algorithm.predict(adapted, task.query_x)
    exported = adapted_module(algorithm, state, module, task.support_x, task.support_y)
    assert not exported.training
    with torch.no_grad():
        torch.testing.assert_close(exported(task.query_x), expected, rtol=1e-4, atol=1e-5)
    assert module.features[0].weight.data_ptr() != exported.features[0].weight.data_ptr()


def test_meta_parameters_export_and_unadapted_predictions_match():
    module = tiny_mlp()
    algorithm, state = trained("maml", module, F.mse_loss)
    x = torch.rand(7, 1)
    with torch.no_grad():
        adapted = algorithm.adapt(state.meta_params, state.buffers, x, x, 0)
        expected = algorithm.predict(adapted, x)
        exported = to_module(module, state.meta_params["params"], state.buffers)
        torch.testing.assert_close(exported(x), expected)


def test_estimated_running_statistics_make_eval_predictions_per_example():
    module = tiny_conv4()
    _, state = trained("maml", module, F.cross_entropy)
    task = image_tasks(seed=9)[0]
    data = torch.cat([task.support_x, task.query_x])
    exported = to_module(
        module, state.meta_params["params"], state.buffers, batch_norm=data
    )  # running statistics of exactly these inputs
    bn = exported.features[1]
    with torch.no_grad():
        first = exported.features[0](data)
        torch.testing.assert_close(bn.running_mean, first.mean((0, 2, 3)))
        torch.testing.assert_close(bn.running_var, first.var((0, 2, 3), unbiased=True))
        # eval-mode predictions on the whole set equal the library's batch-statistics ones
        # up to the biased/unbiased variance, and no longer depend on the other examples:
        alone = exported(data[:1])
        together = exported(data)[:1]
    torch.testing.assert_close(alone, together)


def test_mamlpp_stages_and_bad_input():
    module = tiny_conv4()
    _, state = trained("mamlpp", module, F.cross_entropy)
    staged = state.meta_params["params"]["features.1.weight"]
    exported = to_module(module, state.meta_params["params"], state.buffers, stage=1)
    torch.testing.assert_close(exported.features[1].weight, staged[1])
    with pytest.raises(KeyError, match=r"params: do not match the module: missing \['head.bias'\]"):
        params = dict(state.meta_params["params"])
        del params["head.bias"]
        to_module(module, params, state.buffers)
    with pytest.raises(ValueError, match="stage: expected an integer >= 0"):
        to_module(module, state.meta_params["params"], state.buffers, stage=-1)
    with pytest.raises(ValueError, match="batch_norm: expected 'batch' or a tensor"):
        to_module(module, state.meta_params["params"], state.buffers, batch_norm="running")
