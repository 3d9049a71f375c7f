"""fit: history, early stopping that restores the best state, hooks, clipping, sources."""

import pytest
import torch
import torch.nn.functional as F

from functional_meta import (
    InnerLoop,
    NonFiniteError,
    TaskBatch,
    algorithms,
    functionalize,
    init_state,
    models,
    optim,
)
from functional_meta import tree as fm_tree
from functional_meta.data import sinusoid_tasks
from functional_meta.evaluation import sinusoid_test_tasks
from functional_meta.training import as_task_batch, fit, write_metrics


def setup(algorithm="maml", lr=1e-2):
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.mlp((1, 8, 1)))
    learner = algorithms.build(algorithm, apply, F.mse_loss, InnerLoop(lr=0.01))
    optimizer = optim.adam(lr)
    return learner, optimizer, init_state(learner, params, buffers, optimizer)


def sample(generator):
    return sinusoid_tasks(4, 5, 5, generator=generator)


def test_history_is_complete_and_plain():
    learner, optimizer, state = setup()
    events = []
    result = fit(learner, state, sample, optimizer=optimizer,
                 epochs=3, steps_per_epoch=4, val_tasks=sinusoid_test_tasks(10, seed=5),
                 progress=False, callback=lambda event, record, s: events.append(event))  # fmt: skip
    history = result.history
    assert [r["step"] for r in history.steps] == list(range(1, 13))
    assert [r["epoch"] for r in history.steps] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["epoch"] for r in history.epochs] == [1, 2, 3]
    assert [v["step"] for v in history.validations] == [4, 8, 12]
    assert history.stop_reason == "epochs" and result.progress.step == 12
    for record in history.epochs:
        assert {"loss", "val_loss", "val_loss_ci"} <= record.keys()
    assert history.epochs[0]["loss"] == pytest.approx(sum(r["loss"] for r in history.steps[:4]) / 4)
    assert all(isinstance(r["loss"], float) for r in history.steps)
    assert events.count("step") == 12 and events.count("epoch") == 3
    assert events.count("validation") == 3
    import json

    json.dumps(history.to_dict())  # plain numbers only


def test_early_stopping_stops_and_restores_the_best_state(tmp_path):
    learner, optimizer, state = setup(lr=3e-2)
    seen = {}

    def worsen_after_three(*args, **kwargs):  # ascend after step 3: validation worsens
        gradient = learner.grad(*args, **kwargs)
        seen["calls"] = seen.get("calls", 0) + 1
        sign = 1.0 if seen["calls"] <= 3 else -1.0
        return gradient._replace(grads=fm_tree.scale(sign, gradient.grads))

    states = {}
    result = fit(learner, state, sample, optimizer=optimizer,
                 epochs=20, steps_per_epoch=1, val_tasks=sinusoid_test_tasks(20, seed=5),
                 patience=2, gradient=worsen_after_three, progress=False,
                 checkpoint_dir=tmp_path,
                 callback=lambda e, r, s: states.__setitem__(r["step"], s))  # fmt: skip
    history = result.history
    assert history.stop_reason == "early_stopping"
    best_step = history.best["step"]
    assert best_step == 3
    assert result.progress.step == best_step + 2  # two validations without improvement
    for name, value in result.state.meta_params["params"].items():
        assert torch.equal(value, states[best_step].meta_params["params"][name])
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    # restore_best=False keeps the last state
    again = fit(learner, state, sample, optimizer=optimizer,
                epochs=20, steps_per_epoch=1, val_tasks=sinusoid_test_tasks(20, seed=5), patience=2,
                gradient=worsen_after_three, restore_best=False)  # fmt: skip
    assert not torch.equal(again.state.meta_params["params"]["head.weight"],
                           result.state.meta_params["params"]["head.weight"])  # fmt: skip


def test_min_delta_counts_small_improvements_as_none():
    learner, optimizer, state = setup(lr=1e-4)
    result = fit(learner, state, sample, optimizer=optimizer,
                 epochs=10, steps_per_epoch=1, val_tasks=sinusoid_test_tasks(10, seed=5),
                 patience=2, min_delta=1e3)  # fmt: skip
    assert result.history.stop_reason == "early_stopping" and result.progress.step == 3


def test_clipping_matches_the_chained_optimizer():
    learner, optimizer, state = setup()
    clipped = fit(learner, state, sample, optimizer=optimizer,
                  epochs=1, steps_per_epoch=3, clip_norm=0.1)  # fmt: skip
    chained = optim.chain(optim.clip_by_global_norm(0.1), optimizer)
    state2 = init_state(learner, state.meta_params["params"], state.buffers, chained)
    reference = fit(learner, state2, sample, optimizer=chained,
                    epochs=1, steps_per_epoch=3)  # fmt: skip
    for name, value in clipped.state.meta_params["params"].items():
        torch.testing.assert_close(value, reference.state.meta_params["params"][name])


def test_iterable_sources_in_every_format_and_max_steps():
    learner, optimizer, state = setup()
    batch = sample(torch.Generator().manual_seed(0))
    tuples = [
        ((t.support_x, t.support_y), (t.query_x, t.query_y)) for t in (batch[i] for i in range(4))
    ]
    collated = ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y))
    for item in (batch, tuples, collated):
        converted = as_task_batch(item)
        assert isinstance(converted, TaskBatch) and torch.equal(converted.query_y, batch.query_y)
    result = fit(learner, state, [batch, tuples, collated],
                 optimizer=optimizer, epochs=3, max_steps=7)  # fmt: skip
    assert result.progress.step == 7 and result.history.stop_reason == "max_steps"
    assert len(result.history.epochs) == 2
    with pytest.raises(TypeError, match="tasks"):
        as_task_batch(3)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(
            learner,
            state,
            iter([batch]),
            optimizer=optimizer,
            epochs=2,
        )


def test_non_finite_loss_is_raised_with_the_step():
    learner, optimizer, state = setup()

    def poisoned(generator):
        tasks = sample(generator)
        return TaskBatch(
            tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y * float("nan")
        )

    with pytest.raises(NonFiniteError, match=r"step 1 \(epoch 1\)"):
        fit(learner, state, poisoned, optimizer=optimizer,
            epochs=1, steps_per_epoch=2)  # fmt: skip


def test_non_finite_validation_is_raised_after_the_step_it_follows(tmp_path):
    learner, optimizer, state = setup()
    poisoned = [
        TaskBatch(t.support_x, t.support_y, t.query_x, t.query_y * float("nan"))
        for t in sinusoid_test_tasks(6, seed=5)
    ]
    with pytest.raises(NonFiniteError, match=r"^validation after step 2: .*last good checkpoint"):
        fit(learner, state, sample, optimizer=optimizer, epochs=2,
            steps_per_epoch=2, val_tasks=poisoned, checkpoint_dir=tmp_path, checkpoint_every=1)  # fmt: skip


def test_is_main_process_false_writes_nothing(tmp_path):
    learner, optimizer, state = setup()
    fit(learner, state, sample, optimizer=optimizer, epochs=1,
        steps_per_epoch=2, checkpoint_dir=tmp_path, is_main_process=False, progress=True)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_and_metric_files(tmp_path, capsys):
    learner, optimizer, state = setup()
    result = fit(learner, state, sample, optimizer=optimizer,
                 epochs=1, steps_per_epoch=3, progress=True)  # fmt: skip
    assert "loss=" in capsys.readouterr().err
    paths = write_metrics(result.history, tmp_path)
    assert [p.name for p in paths] == ["metrics.jsonl", "metrics.csv", "epochs.csv"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (tmp_path / "metrics.csv").read_text().startswith("step,epoch,loss")


def test_fit_argument_errors():
    learner, optimizer, state = setup()
    common = dict(optimizer=optimizer)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fit(learner, state, sample, **common)
    with pytest.raises(ValueError, match="patience"):
        fit(learner, state, sample, steps_per_epoch=1, patience=2, **common)
    with pytest.raises(ValueError, match="epochs"):
        fit(learner, state, sample, steps_per_epoch=1, epochs=0, **common)
    with pytest.raises(TypeError, match="tasks"):
        fit(learner, state, 5, **common)
    with pytest.raises(ValueError, match="monitor"):
        fit(learner, state, sample, steps_per_epoch=1, monitor="acc", **common)


def test_fit_and_the_conveniences_are_exported():
    import functional_meta

    assert functional_meta.fit is fit
    assert functional_meta.MAML.__name__ == "MAML" and callable(functional_meta.evaluate)
