"""The class-based API (MAML, Reptile, MetaSGD) on the sinusoid task."""

import pytest
import torch
from torch import nn

from functional_meta.classic import MAML, MetaSGD, Reptile
from functional_meta.data import sinusoid_tasks
from functional_meta.evaluation import sinusoid_test_tasks


def loader(num_batches, seed, tasks_per_batch=10, as_tuples=False):
    generator = torch.Generator().manual_seed(seed)
    batches = [sinusoid_tasks(tasks_per_batch, generator=generator) for _ in range(num_batches)]
    if as_tuples:  # the original format: a list of ((support_x, support_y), (query_x, query_y))
        return [[((b.support_x[i], b.support_y[i]), (b.query_x[i], b.query_y[i]))
                 for i in range(len(b))] for b in batches]  # fmt: skip
    return batches


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def test_maml_training_lowers_the_post_adaptation_mse():
    maml = MAML(model=net(), loss=nn.MSELoss(), maml_plus_plus=False, inner_lr=1e-2,
                meta_lr=1e-2, device="cpu", clipping=10.0, eval_steps=5)  # fmt: skip
    test = sinusoid_test_tasks(100)
    before = maml.evaluate(test)
    history = maml.train(loader(30, 0, as_tuples=True), loader(2, 1), epochs=3)
    after = maml.evaluate(test)
    assert after.loss < 0.75 * before.loss, (before.loss, after.loss)
    assert len(history.steps) == 90 and len(history.epochs) == 3 and len(history.validations) == 3
    assert isinstance(maml.module, nn.Sequential)
    torch.testing.assert_close(maml.module[0].weight, maml.params["0.weight"])


def test_optimizer_state_and_counters_survive_train_calls():
    maml = MAML(net(), inner_lr=1e-2, meta_lr=1e-3)
    maml.train(loader(3, 0), epochs=1)
    count = int(maml.state.opt_state["count"])
    assert count == 3 and maml.progress.step == 3
    history = maml.train(loader(3, 0), epochs=2)
    assert int(maml.state.opt_state["count"]) == 9 and maml.progress.epoch == 3
    assert [r["step"] for r in history.steps] == list(range(4, 10))


def test_reptile_and_metasgd_and_mamlpp_train(tmp_path):
    test = sinusoid_test_tasks(50)
    reptile = Reptile(net(), nn.MSELoss(), inner_lr=1e-2, meta_lr=1e-2, clipping=4.0, inner_steps=3)
    before = reptile.evaluate(test, steps=5).loss
    reptile.train(loader(20, 0), epochs=2)
    assert reptile.evaluate(test, steps=5).loss < before
    metasgd = MetaSGD(net(), nn.MSELoss(), inner_lr=1e-2, meta_lr=1e-3)
    metasgd.train(loader(2, 0), epochs=1)
    assert "inner_lr" in metasgd.state.meta_params
    mamlpp = MAML(net(), nn.MSELoss(), maml_plus_plus=True, inner_steps=2, inner_lr=1e-2)
    history = mamlpp.train(loader(2, 0), loader(1, 1), epochs=2, patience=5)
    assert mamlpp.algorithm.name == "mamlpp" and len(history.epochs) == 2
    mamlpp.save(tmp_path / "m.pt")
    other = MAML(net(), nn.MSELoss(), maml_plus_plus=True, inner_steps=2, inner_lr=1e-2)
    other.load(tmp_path / "m.pt")
    assert other.progress.step == 4
    torch.testing.assert_close(other.params, mamlpp.params)


def test_constructor_errors_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        MAML("not a model")
    with pytest.raises(ValueError, match="clip"):
        MAML(net(), clipping=-1.0)
    with pytest.raises(ValueError, match="choose at most one"):
        MAML(net(), maml_plus_plus=True, first_order=True)
    with pytest.raises(ValueError, match="inner_lr"):
        MetaSGD(net(), inner_lr=0.0)


def test_load_refuses_a_checkpoint_of_another_model_or_algorithm(tmp_path):
    MAML(model=net(), loss=nn.MSELoss(), device="cpu").save(tmp_path / "maml.pt")
    MetaSGD(model=net(), loss=nn.MSELoss(), device="cpu").save(tmp_path / "metasgd.pt")
    wider = nn.Sequential(
        nn.Linear(1, 80), nn.ReLU(), nn.Linear(80, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    with pytest.raises(
        ValueError, match=r"params/0.weight is \(40, 1\) in the checkpoint, \(80, 1\)"
    ):
        MAML(model=wider, loss=nn.MSELoss(), device="cpu").load(tmp_path / "maml.pt")
    with pytest.raises(ValueError, match="written by 'metasgd', not 'maml'"):
        MAML(model=net(), loss=nn.MSELoss(), device="cpu").load(tmp_path / "metasgd.pt")
    MAML(model=net(), loss=nn.MSELoss(), device="cpu").load(tmp_path / "maml.pt")  # the same: fine
