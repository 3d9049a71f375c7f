"""Loggers: metrics written as they happen (and continued exactly on resume), the status line
without a terminal (fake clock), TensorBoard scalars read back from the event file."""

import io
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from functional_meta import InnerLoop, algorithms, functionalize, init_state, models, optim
from functional_meta.data import sinusoid_tasks
from functional_meta.evaluation import sinusoid_test_tasks
from functional_meta.history import History, write_metrics
from functional_meta.loggers import Logger, MetricsFile, StatusLine, TensorBoard
from functional_meta.training import fit


def setup():
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.mlp((1, 8, 1)))
    learner = algorithms.maml(apply, F.mse_loss, InnerLoop(lr=0.01))
    optimizer = optim.adam(1e-2)
    return learner, optimizer, init_state(learner, params, buffers, optimizer)


def sample(generator):
    return sinusoid_tasks(4, 5, 5, generator=generator)


RUN = dict(epochs=3, steps_per_epoch=3, generator=0, val_tasks=sinusoid_test_tasks(5, seed=5),
           progress=False)  # fmt: skip


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_metrics_are_on_disk_when_each_step_ends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    seen = []

    def callback(event, record, state):  # runs after the loggers
        seen.append((event, lines(path)[-1]["kind"], lines(path)[-1]["step"], record["step"]))

    learner, optimizer, state = setup()
    result = fit(learner, state, sample, optimizer=optimizer, loggers=[MetricsFile(path)],
                 callback=callback, **RUN)  # fmt: skip
    assert seen[0] == ("step", "step", 1, 1)
    assert all(event == kind and step == at for event, kind, step, at in seen)
    write_metrics(result.history, tmp_path / "all")  # the same file, written at once
    assert lines(path) == lines(tmp_path / "all" / "metrics.jsonl")
    kinds = [r["kind"] for r in lines(path)]
    assert kinds[:5] == ["step", "step", "step", "validation", "epoch"] and len(kinds) == 15


class Stop(Exception):
    pass


def test_a_resumed_run_continues_the_file_without_repeating_records(tmp_path):
    """Stopped at step 7, after the checkpoint of step 6 but also after the end of epoch 2
    (validation and epoch lines the checkpoint does not hold): the resumed run's file is the
    uninterrupted run's, line for line."""
    learner, optimizer, state = setup()
    reference = tmp_path / "reference.jsonl"
    fit(learner, state, sample, optimizer=optimizer, loggers=[MetricsFile(reference)], **RUN)

    def stop_at_7(event, record, state):
        if event == "step" and record["step"] == 7:
            raise Stop

    path = tmp_path / "run" / "metrics.jsonl"
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(Stop):
        fit(learner, state, sample, optimizer=optimizer, loggers=[MetricsFile(path)],
            checkpoint_dir=checkpoints, checkpoint_every=2, callback=stop_at_7, **RUN)  # fmt: skip
    stopped = lines(path)
    assert [r["step"] for r in stopped if r["kind"] == "step"] == list(range(1, 8))
    assert [r["kind"] for r in stopped][-3:] == ["validation", "epoch", "step"]  # after step 6

    fit(learner, state, sample, optimizer=optimizer, loggers=[MetricsFile(path)],
        resume=checkpoints / "last.pt", checkpoint_dir=checkpoints, **RUN)  # fmt: skip
    resumed = lines(path)
    assert [r["step"] for r in resumed if r["kind"] == "step"] == list(range(1, 10))
    assert without_time(resumed) == without_time(lines(reference))


def test_status_line_every_n_seconds_of_a_fake_clock():
    now = [100.0]
    stream = io.StringIO()
    line = StatusLine(30, stream=stream, clock=lambda: now[0])
    line.on_start(History(), step=0, total=1000)
    for step, seconds in ((1, 10), (2, 29.9), (3, 30), (4, 45), (5, 60)):
        now[0] = 100.0 + seconds
        if step == 2:
            line.on_validation({"step": 2, "val_loss": 0.25, "val_accuracy": 0.5})
        line.on_step({"step": step, "epoch": 0, "loss": 1.0 / step, "accuracy": 0.75})
    printed = stream.getvalue().splitlines()
    assert printed == [
        "step 3/1000 (epoch 1) loss=0.3333 acc=0.750 val_loss=0.25 val_acc=0.500 "
        "| 0.1 steps/s, ETA 2:46:10",
        "step 5/1000 (epoch 1) loss=0.2 acc=0.750 val_loss=0.25 val_acc=0.500 "
        "| 0.0833 steps/s, ETA 3:19:00",
    ]


def test_status_line_of_a_resumed_run_counts_its_own_steps():
    now = [0.0]
    stream = io.StringIO()
    line = StatusLine(5, stream=stream, clock=lambda: now[0])
    history = History(steps=[{"step": 500, "epoch": 0, "loss": 0.5}])
    line.on_start(history, step=500, total=None)
    now[0] = 10.0
    line.on_step({"step": 520, "epoch": 1, "loss": 0.25})
    assert stream.getvalue() == "step 520 (epoch 2) loss=0.25 | 2 steps/s\n"
    with pytest.raises(ValueError, match="every_seconds"):
        StatusLine(0)


def test_fit_prints_status_lines_without_a_bar(capsys):
    learner, optimizer, state = setup()
    fit(learner, state, sample, optimizer=optimizer, epochs=1, steps_per_epoch=3,
        progress=False, log_every_seconds=1e-9)  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in err] == ["1/3", "2/3", "3/3"]
    assert all("loss=" in line and "steps/s" in line for line in err)
    fit(learner, state, sample, optimizer=optimizer, epochs=1, steps_per_epoch=3, progress=False)
    assert capsys.readouterr().err == ""  # silent by default


class Recorder(Logger):
    def __init__(self):
        self.calls = []

    def on_start(self, history, step, total):
        self.calls.append(("start", step, total))

    def on_step(self, record):
        self.calls.append(("step", record["step"]))

    def on_validation(self, record):
        self.calls.append(("validation", record["step"]))

    def on_epoch(self, record):
        self.calls.append(("epoch", record["epoch"]))

    def close(self):
        self.calls.append(("close",))


def test_every_logger_sees_every_record_in_order_and_is_closed_on_errors():
    learner, optimizer, state = setup()
    recorder = Recorder()
    fit(learner, state, sample, optimizer=optimizer, loggers=[recorder], epochs=1,
        steps_per_epoch=2, val_tasks=sinusoid_test_tasks(5, seed=5), progress=False)  # fmt: skip
    assert recorder.calls == [("start", 0, 2), ("step", 1), ("step", 2), ("validation", 2),
                              ("epoch", 1), ("close",)]  # fmt: skip

    def fail(event, record, state):
        raise Stop

    recorder = Recorder()
    with pytest.raises(Stop):
        fit(learner, state, sample, optimizer=optimizer, loggers=[recorder], epochs=1,
            steps_per_epoch=2, progress=False, callback=fail)  # fmt: skip
    assert recorder.calls[-1] == ("close",)

    other_rank = Recorder()
    fit(learner, state, sample, optimizer=optimizer, loggers=[other_rank], epochs=1,
        steps_per_epoch=2, progress=False, is_main_process=False)  # fmt: skip
    assert other_rank.calls == []


def test_fit_refuses_bad_loggers_and_intervals():
    learner, optimizer, state = setup()
    common = dict(optimizer=optimizer, steps_per_epoch=1, progress=False)
    with pytest.raises(TypeError, match="loggers: expected a sequence of loggers.Logger"):
        fit(learner, state, sample, loggers=[print], **common)
    with pytest.raises(TypeError, match="loggers"):
        fit(learner, state, sample, loggers=MetricsFile("m.jsonl"), **common)
    with pytest.raises(ValueError, match="log_every_seconds"):
        fit(learner, state, sample, log_every_seconds=0, **common)


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner, optimizer, state = setup()
    result = fit(learner, state, sample, optimizer=optimizer,
                 loggers=[TensorBoard(tmp_path / "tb")], **RUN)  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/loss", "epoch/loss"} <= set(tags)
    assert not any(tag.endswith(("/step", "/time", "_ci")) for tag in tags)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 10))
    expected = [r["loss"] for r in result.history.steps]
    assert [e.value for e in loss] == pytest.approx(expected, rel=1e-6)
    val = events.Scalars("val/loss")
    assert [(e.step, e.value) for e in val] == [
        (v["step"], pytest.approx(v["val_loss"], rel=1e-6)) for v in result.history.validations
    ]


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'functional-meta\[tensorboard\]'"):
        TensorBoard(tmp_path)
