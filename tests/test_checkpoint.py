"""Checkpoints: atomic writes, clear errors, and resume == straight through, bit for bit."""

import errno
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from functional_meta import (
    InnerLoop,
    NonFiniteError,
    algorithms,
    functionalize,
    init_state,
    models,
    optim,
)
from functional_meta.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from functional_meta.data import sinusoid_tasks
from functional_meta.evaluation import sinusoid_test_tasks
from functional_meta.training import FitProgress, fit


def sample(generator):
    return sinusoid_tasks(4, 5, 5, generator=generator)


def run(algorithm, tmp_path, **options):
    torch.manual_seed(0)
    module = models.mlp((1, 8, 1))
    if algorithm.endswith("-dropout"):  # masks from fit's generator, which checkpoints keep
        algorithm = algorithm.removesuffix("-dropout")
        module = torch.nn.Sequential(torch.nn.Dropout(0.3), module)
    apply, params, buffers = functionalize(module)
    own = {"batch_size": 6} if algorithm == "reptile" else {}
    record = algorithms.build(algorithm, apply, F.mse_loss, InnerLoop(lr=0.01, steps=2), **own)
    optimizer = optim.chain(optim.clip_by_global_norm(5.0), optim.adam(1e-2))
    state = init_state(record, params, buffers, optimizer)
    return fit(record, state, sample, optimizer=optimizer,
               epochs=3, steps_per_epoch=4, generator=7, val_tasks=sinusoid_test_tasks(6, seed=5),
               patience=10, **options)  # fmt: skip


def assert_same_state(a, b):
    flat_a = torch.utils._pytree.tree_flatten(tuple(a))[0]
    flat_b = torch.utils._pytree.tree_flatten(tuple(b))[0]
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "maml-dropout"])
def test_resume_equals_straight_through_bit_for_bit(tmp_path, algorithm):
    straight = run(algorithm, tmp_path / "a", max_steps=10)
    first = run(algorithm, tmp_path / "b", max_steps=6, checkpoint_dir=tmp_path / "b")
    assert first.progress.step == 6 and first.history.stop_reason == "max_steps"
    resumed = run(algorithm, tmp_path / "c", max_steps=10, resume=tmp_path / "b" / "last.pt")
    assert resumed.progress.step == 10
    assert_same_state(resumed.state, straight.state)
    strip = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert strip(resumed.history.steps) == strip(straight.history.steps)
    assert resumed.history.epochs == straight.history.epochs
    assert resumed.history.validations == straight.history.validations


def test_save_load_round_trip(tmp_path):
    apply, params, buffers = functionalize(models.conv4(3, hidden=4))
    record = algorithms.metasgd(apply, F.cross_entropy)
    state = init_state(record, params, buffers, optim.adam(1e-3))
    generator = torch.Generator().manual_seed(3)
    path = save_checkpoint(tmp_path / "x" / "ck.pt", state, step=5, epoch=1,
                           generators={"tasks": generator}, config={"algorithm": "metasgd", "ways": 3},
                           extra={"best_state": state, "note": [1, 2]})  # fmt: skip
    expected = torch.rand(3, generator=generator)
    loaded = load_checkpoint(path)
    assert (loaded.step, loaded.epoch, loaded.config) == (5, 1, {"algorithm": "metasgd", "ways": 3})
    assert_same_state(loaded.state, state)
    assert_same_state(loaded.extra["best_state"], state)
    assert loaded.extra["note"] == [1, 2]
    restored = loaded.restore_generator(torch.Generator())
    assert torch.equal(torch.rand(3, generator=restored), expected)
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temporary files left


def test_truncated_foreign_and_missing_files_give_clear_errors(tmp_path):
    apply, params, buffers = functionalize(models.mlp((1, 4, 1)))
    state = init_state(algorithms.maml(apply, F.mse_loss), params, buffers, optim.sgd(0.1))
    path = save_checkpoint(tmp_path / "good.pt", state)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*truncated, corrupt"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not written by functional_meta"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    apply, params, buffers = functionalize(models.mlp((1, 4, 1)))
    state = init_state(algorithms.maml(apply, F.mse_loss), params, buffers, optim.sgd(0.1))
    path = save_checkpoint(tmp_path / "ck.pt", state, step=1)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, state, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


def small_state():
    apply, params, buffers = functionalize(models.mlp((1, 4, 1)))
    return init_state(algorithms.maml(apply, F.mse_loss), params, buffers, optim.adam(0.1))


def flip_a_tensor_byte(path):
    """Flip one bit in the middle of the largest tensor record, in place (the zip's own CRC is
    left stale, as after bit rot on disk)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename)]
    record = max(records, key=lambda i: i.file_size)
    assert record.compress_type == zipfile.ZIP_STORED
    offset = record.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(data)


def test_a_flipped_bit_in_tensor_data_is_detected(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", small_state(), step=3)
    flip_a_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=r"ck\.pt.*checksum mismatch.*corrupt"):
        load_checkpoint(path)


def test_a_changed_plain_value_or_missing_digest_is_detected(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", small_state(), step=3, config={"lr": 0.1})
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"step": 4}, tmp_path / "step.pt")
    with pytest.raises(CheckpointError, match=r"step\.pt.*checksum mismatch"):
        load_checkpoint(tmp_path / "step.pt")
    torch.save(payload | {"config": {"lr": 0.2}}, tmp_path / "config.pt")
    with pytest.raises(CheckpointError, match=r"config\.pt.*checksum mismatch"):
        load_checkpoint(tmp_path / "config.pt")
    torch.save({k: v for k, v in payload.items() if k != "sha256"}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare\.pt.*no checksum"):
        load_checkpoint(tmp_path / "bare.pt")


def test_version_1_files_without_a_digest_still_load(tmp_path):
    state = small_state()
    payload = torch.load(save_checkpoint(tmp_path / "ck.pt", state, step=3), weights_only=True)
    del payload["sha256"]
    torch.save(payload | {"version": 1}, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert loaded.step == 3
    assert_same_state(loaded.state, state)
    torch.save(payload | {"version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="v99.pt has format version 99"):
        load_checkpoint(tmp_path / "v99.pt")


KILLED_MID_WRITE = """
import os, signal, sys
from functional_meta.checkpoint import atomic_write

def die(handle):
    handle.write(b"partial")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[2], lambda handle: atomic_write(sys.argv[1], die))
"""


def backdate(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.skipif(os.name != "posix", reason="the writer's pid is checked with kill(pid, 0)")
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, tmp_path / "ck.pt",
                            tmp_path / "other.pt"], env=env, capture_output=True)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    (orphan,) = tmp_path.glob(".ck.pt.*.tmp")
    (other,) = tmp_path.glob(".other.pt.*.tmp")  # another target's: never touched
    # The writer's host and pid are in the name; the child is gone (reaped), so is its pid.
    host, pid = re.fullmatch(r"\.ck\.pt\.(.*)-(\d+)\.\w+\.tmp", orphan.name).groups()
    fresh = orphan.with_name(f".ck.pt.{host}-{pid}.fresh000.tmp")  # dead writer, but just now
    alive = orphan.with_name(f".ck.pt.{host}-{os.getppid()}.alive000.tmp")  # a live writer
    foreign = orphan.with_name(f".ck.pt.elsewhere-{pid}.abroad00.tmp")  # pid not checkable
    foreign_old = orphan.with_name(f".ck.pt.elsewhere-{pid}.abroad11.tmp")
    legacy_old = orphan.with_name(".ck.pt.a1b2c3d4.tmp")  # mkstemp's name, before pids
    legacy_new = orphan.with_name(".ck.pt.e5f6g7h8.tmp")
    unrelated = tmp_path / "ck.pt.notes.tmp"
    for path in (fresh, alive, foreign, foreign_old, legacy_old, legacy_new, unrelated):
        path.write_bytes(b"x")
    for path in (orphan, other, alive):
        backdate(path, 120)  # a minute past the grace period
    backdate(foreign, 1800)
    backdate(legacy_new, 1800)
    backdate(legacy_old, 7200)  # an hour past: no writer takes that long
    backdate(foreign_old, 7200)
    save_checkpoint(tmp_path / "ck.pt", small_state())
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = {"ck.pt", other.name, fresh.name, alive.name, foreign.name, legacy_new.name,
                unrelated.name}  # fmt: skip
    assert left == sorted(expected)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_files_get_the_permissions_a_plain_open_gives(tmp_path):
    state = small_state()
    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            written = save_checkpoint(tmp_path / f"ck{umask:o}.pt", state)
            metrics = atomic_write(tmp_path / f"m{umask:o}.json", lambda h: h.write(b"{}"))
            with open(tmp_path / f"plain{umask:o}", "w"):
                pass
        finally:
            os.umask(previous)
        plain = stat.S_IMODE((tmp_path / f"plain{umask:o}").stat().st_mode)
        assert plain == 0o666 & ~umask
        assert stat.S_IMODE(written.stat().st_mode) == plain
        assert stat.S_IMODE(metrics.stat().st_mode) == plain


def fail_after(limit, handle):
    """A file whose writes fail with ENOSPC once ``limit`` bytes have gone through."""

    class Full:
        written = 0

        def write(self, data):
            Full.written += len(data)
            if Full.written > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return handle.write(data)

        def flush(self):
            handle.flush()

    return Full()


# torch.save turns a write error inside its zip writer into RuntimeError("... unexpected
# pos ...") (the OSError is its __context__), but lets one at the end through as it is.
@pytest.mark.parametrize("where", [1000, 4096, "fsync"], ids=["torch-zip", "write", "fsync"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, where):
    state = small_state()
    path = save_checkpoint(tmp_path / "ck.pt", state, step=1)
    if where == "fsync":

        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, fail_after(where, f)))
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, state, step=2)
    monkeypatch.undo()
    error = caught.value
    assert type(error) is OSError and error.errno == errno.ENOSPC
    message = str(error)
    assert str(path) in message and "disk is full" in message and "\n" not in message
    assert load_checkpoint(path).step == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


def start(algorithm="maml", widths=(1, 8, 1), optimizer=None):
    torch.manual_seed(0)
    apply, params, buffers = functionalize(models.mlp(widths))
    record = algorithms.build(algorithm, apply, F.mse_loss, InnerLoop(lr=0.01))
    optimizer = optimizer or optim.adam(1e-2)
    return record, optimizer, init_state(record, params, buffers, optimizer)


def test_resume_refuses_a_checkpoint_of_another_model_shape_naming_it(tmp_path):
    record, optimizer, state = start()
    fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path)
    wider, optimizer, state = start(widths=(1, 16, 1))
    with pytest.raises(ValueError, match=r"does not fit the state given") as error:
        fit(wider, state, sample, optimizer=optimizer, epochs=2, steps_per_epoch=2,
            resume=tmp_path / "last.pt")  # fmt: skip
    assert "params/head.weight is (1, 8) in the checkpoint, (1, 16) in the state" in str(
        error.value
    )


@pytest.mark.parametrize(("written", "resumed"), [("metasgd", "maml"), ("maml", "metasgd"),
                                                  ("maml", "fomaml")])  # fmt: skip
def test_resume_refuses_a_checkpoint_of_another_algorithm(tmp_path, written, resumed):
    record, optimizer, state = start(written)
    fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path)
    other, optimizer, state = start(resumed)
    with pytest.raises(ValueError, match=f"was written by '{written}', not '{resumed}'"):
        fit(other, state, sample, optimizer=optimizer, epochs=2, steps_per_epoch=2,
            resume=tmp_path / "last.pt")  # fmt: skip


def test_a_checkpoint_without_the_algorithm_name_is_still_checked_by_shape(tmp_path):
    record, optimizer, state = start("metasgd")
    fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    del checkpoint.extra["algorithm"]  # as fit wrote it before it recorded the algorithm
    other, optimizer, state = start("maml")
    with pytest.raises(ValueError, match=r"meta_params/inner_lr/.* only in the checkpoint"):
        fit(other, state, sample, optimizer=optimizer, epochs=2, steps_per_epoch=2,
            resume=checkpoint)  # fmt: skip


def test_resumed_progress_counts_the_whole_runs_training_time(tmp_path):
    record, optimizer, state = start()

    def slow(event, record, state):
        if event == "step":
            time.sleep(0.05)

    first = fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2,
                checkpoint_dir=tmp_path, callback=slow, progress=False)  # fmt: skip
    saved = load_checkpoint(tmp_path / "last.pt").extra["fit"]["seconds"]
    assert first.progress.seconds >= saved >= 0.1  # two sleeps of 0.05 s
    resumed = fit(record, state, sample, optimizer=optimizer, epochs=2, steps_per_epoch=2,
                  resume=tmp_path / "last.pt", callback=slow, progress=False)  # fmt: skip
    assert resumed.progress.seconds >= saved + 0.1  # the first call's time and the second's


def test_a_non_finite_update_is_never_saved_and_the_last_good_checkpoint_resumes(tmp_path):
    rates = {0: 1e-3, 1: 1e-3}
    record, optimizer, state = start(optimizer=optim.sgd(lambda step: rates.get(step, 1e39)))
    with pytest.raises(NonFiniteError, match=r"step 3 .*last good checkpoint: .*last.pt"):
        fit(record, state, sample, optimizer=optimizer, steps_per_epoch=4, checkpoint_every=1,
            checkpoint_dir=tmp_path)  # fmt: skip
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved.step == 2
    assert all(bool(torch.isfinite(t).all()) for t in saved.state.meta_params["params"].values())
    result = fit(record, state, sample, optimizer=optim.sgd(1e-3), steps_per_epoch=4,
                 resume=saved)  # fmt: skip
    assert result.progress.step == 4


def test_resume_refuses_another_epoch_length(tmp_path):
    record, optimizer, state = start()
    fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path)
    with pytest.raises(
        ValueError, match="steps_per_epoch: the run in .* has epochs of 2 steps, got 3"
    ):
        fit(record, state, sample, optimizer=optimizer, epochs=2, steps_per_epoch=3,
            resume=tmp_path / "last.pt")  # fmt: skip


@pytest.mark.parametrize("value", [Path("runs/x"), np.float64(1.0), object()])
def test_a_value_that_would_not_load_back_is_refused_before_writing(tmp_path, value):
    state = start()[2]
    with pytest.raises(
        TypeError, match=r"config\['where'\]: a .* cannot be stored in a checkpoint"
    ):
        save_checkpoint(tmp_path / "c.pt", state, config={"where": value})
    assert not (tmp_path / "c.pt").exists()
    with pytest.raises(TypeError, match=r"extra\['x'\]\[1\]: a .* cannot be stored"):
        save_checkpoint(tmp_path / "c.pt", state, extra={"x": [1, value]})
    saved = save_checkpoint(tmp_path / "c.pt", state, config={"where": str(value), "set": {1}})
    assert load_checkpoint(saved).config["where"] == str(value)


def test_a_new_fit_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path):
    record, optimizer, state = start()
    fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path,
        val_tasks=sinusoid_test_tasks(4, seed=5))  # fmt: skip
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt")}
    with pytest.raises(ValueError, match=r"checkpoint_dir: .* holds the checkpoints of another "
                       r"run \(last.pt, best.pt\); pass resume="):  # fmt: skip
        fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2, checkpoint_dir=tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    fit(
        record,
        state,
        sample,
        optimizer=optimizer,
        epochs=2,
        steps_per_epoch=2,
        checkpoint_dir=tmp_path,
        resume=tmp_path / "last.pt",
    )  # continuing it is fine


def test_resume_refuses_a_checkpoint_with_non_finite_parameters(tmp_path):
    record, optimizer, state = start()
    params = {k: torch.full_like(v, float("nan")) for k, v in state.meta_params["params"].items()}
    broken = state._replace(meta_params={"params": params})
    progress = {"fit": FitProgress().to_dict(), "best_state": None}
    save_checkpoint(tmp_path / "old.pt", broken, extra=progress)  # as an older version could
    with pytest.raises(ValueError, match="holds NaN or infinite meta-parameters"):
        fit(record, state, sample, optimizer=optimizer, steps_per_epoch=2,
            resume=tmp_path / "old.pt")  # fmt: skip
