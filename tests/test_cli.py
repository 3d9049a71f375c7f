"""The command line, end to end on tiny budgets, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from functional_meta.cli import main

TINY = ["--steps", "6", "--steps-per-epoch", "3", "--meta-batch-size", "4", "--hidden", "8",
        "--val-tasks", "5", "--test-tasks", "10", "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_evaluate_and_resume_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "before meta-training" in printed and "after meta-training" in printed
    assert "±" in printed
    for name in ("sinusoid.png", "learning_curves.png", "metrics.jsonl", "metrics.csv",
                 "epochs.csv", "results.json", "config.json", "checkpoints/last.pt",
                 "checkpoints/final.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6 and set(results["after"]) == {"0", "1", "10"}
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["threads"] >= 1
    assert results["code"]  # a commit in a checkout, else the package version
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("step") == 6 and kinds.count("epoch") == 2 and kinds.count("validation") == 2

    assert main(["evaluate", str(out), "--eval-inner-steps", "2", "--test-tasks", "7"]) == 0
    line = capsys.readouterr().out
    assert (
        "test MSE" in line and "±" in line and "7 tasks of 10 query points, 2 inner steps" in line
    )

    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "8", "--no-progress",
                 "--no-plots"]) == 0  # fmt: skip
    assert "meta-trained 8 steps" in capsys.readouterr().out


def test_default_output_directory():
    from functional_meta.cli.arguments import build_parser as _parser
    from functional_meta.cli.arguments import default_output_dir as _default_output_dir

    assert _default_output_dir(_parser().parse_args(["train"])) == "runs/default"
    args = _parser().parse_args(["train", "--algorithm", "reptile"])
    assert _default_output_dir(args) == "runs/sinusoid-reptile"


def test_other_algorithms_and_loop_strategy(tmp_path, capsys):
    for algorithm in ("reptile", "metasgd", "imaml"):
        args = ["--algorithm", algorithm, "--strategy", "loop", "--no-plots", "--val-tasks", "0",
                "--no-baseline"]  # fmt: skip
        assert main([*TINY, *args, "--output-dir", str(tmp_path / algorithm)]) == 0
        results = json.loads((tmp_path / algorithm / "results.json").read_text())
        assert results["before"] is None and {"0", "1"} <= set(results["after"])
    printed = capsys.readouterr().out
    assert "metasgd on sinusoid" in printed and "before meta-training" not in printed


FLOAT_OPTIONS = ("--inner-lr", "--meta-lr", "--clip", "--inner-clip", "--min-delta", "--msl-epochs",
                 "--first-order-epochs", "--regularization", "--damping", "--hessian-damping")  # fmt: skip
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "bogus"], "invalid choice: 'bogus'"),
        (["--dataset", "omniglot", "--ways", "1"], "--ways must be >= 2"),
        (["--inner-steps", "0"], "--inner-steps must be >= 1"),
        (["--steps", "3", "--epochs", "2"], "not both"),
        (["--patience", "2", "--val-tasks", "0"], "--patience needs validation"),
        (["--msl-epochs", "2"], "--msl-epochs: maml has no option msl_anneal_epochs"),
        (["--damping", "0.1"], "--damping: maml has no option damping"),
        (["--algorithm", "imaml", "--damping", "-1"], "--damping must be >= 0, got -1.0"),
        (["--algorithm", "imaml", "--hessian-damping", "-1"], "--hessian-damping must be >= 0"),
        (["--algorithm", "imaml", "--regularization", "0"], "--regularization must be positive"),
        (["--protocol", "lake"], "--protocol is for omniglot; sinusoid has no protocols"),
        (["--dataset", "omniglot", "--protocol", "x"], "invalid choice: 'x'"),
        (
            ["--algorithm", "mamlpp", "--msl-epochs", "0"],
            "--msl-epochs must be a finite number > 0",
        ),
        (["--algorithm", "mamlpp", "--first-order-epochs", "-1"], "--first-order-epochs must be"),
        (["--log-every-seconds", "-1"], "--log-every-seconds must be >= 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--chunk-size", "big"], "expected an integer or auto, got 'big'"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1, got 0"),
        (["--steps", "-5"], "--steps must be >= 1, got -5"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--device", "foo"], "--device: 'foo' is not a device"),
        (["--device", "meta"], "--device: 'meta' is not supported"),
        pytest.param(["--device", "cuda"], "CUDA is not available", marks=NO_CUDA),
        (["--ways", "3"], "--ways: the sinusoid task is a regression and has no classes"),
        (["--train-ways", "20"], "--train-ways: the sinusoid task is a regression"),
        (["--dataset", "omniglot", "--train-ways", "1"], "--train-ways must be >= 2, got 1"),
        (
            ["--dataset", "omniglot", "--train-ways", "20"],
            "--train-ways: maml's meta-parameters depend on the number of classes",
        ),
        (["--output-dir", ""], "--output-dir must name a directory"),
        (["--resume", "--overwrite"], "give one"),
        (["--data-dir", "somewhere"], "--data-dir: the sinusoid tasks are generated"),
        (["--cache-dir", "somewhere"], "--cache-dir: the sinusoid tasks are generated"),
        (["--seed", str(2**64)], "--seed must be an integer in [-2**63, 2**64)"),
        (
            ["--meta-lr-decay-steps", "5"],
            "--meta-lr-decay-steps is the horizon of --meta-lr-schedule cosine",
        ),
        (
            ["--meta-lr-schedule", "cosine", "--meta-lr-decay-steps", "0"],
            "--meta-lr-decay-steps must be >= 1, got 0",
        ),
        *[
            ([option, value], f"{option} must be a finite number, got {value}")
            for option in FLOAT_OPTIONS
            for value in ("nan", "inf")
        ],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    try:
        status = main(["--output-dir", str(tmp_path), *argv])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main([*TINY, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'file'} is a file, not a directory" in err, err


def test_argument_errors_come_before_the_process_group_is_joined(tmp_path, monkeypatch, capsys):
    """Under torchrun a bad argument is one line on every rank: no rank joins the group."""
    from functional_meta import distributed

    def init(*args, **kwargs):
        raise AssertionError("joined the process group before checking the arguments")

    monkeypatch.setattr(distributed, "init", init)
    for argv in (["--steps", "0"], ["--device", "foo"], ["--min-delta", "nan"]):
        assert main([*argv, "--output-dir", str(tmp_path)]) == 2
    assert main(["--resume", "--meta-lr", "0.5", "--output-dir", str(tmp_path)]) == 1  # no run
    err = capsys.readouterr().err
    assert "last.pt does not exist, nothing to continue" in err and "--overwrite" in err, err


def test_evaluate_refuses_bad_devices_and_thread_counts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-plots", "--no-baseline", "--output-dir", str(out)]) == 0
    for argv, message in ((["--device", "foo"], "'foo' is not a device"),
                          (["--threads", "0"], "--threads must be >= 1"),
                          (["--queries", "0"], "--queries must be >= 1, got 0")):  # fmt: skip
        capsys.readouterr()
        assert main(["evaluate", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_previous_run_is_never_overwritten_without_being_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--output-dir", str(out)]) == 0
    saved = {name: (out / name).read_bytes() for name in
             ("results.json", "config.json", "checkpoints/last.pt", "checkpoints/final.pt")}  # fmt: skip
    capsys.readouterr()
    assert main([*TINY, "--seed", "1", "--no-plots", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "--resume" in err, err
    assert len(err.strip().splitlines()) == 1
    assert {name: (out / name).read_bytes() for name in saved} == saved  # untouched
    # --overwrite replaces the whole run: nothing of the first one is left behind.
    again = [*TINY, "--seed", "1", "--no-plots", "--no-baseline", "--overwrite"]
    assert main([*again, "--output-dir", str(out)]) == 0
    assert "removing the previous run" in capsys.readouterr().out
    assert not (out / "sinusoid.png").exists() and not (out / "baseline.json").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert json.loads((out / "results.json").read_text())["before"] is None


def test_a_run_in_progress_locks_its_directory_against_a_second_run(tmp_path, capsys):
    from functional_meta.files import host_name

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".functional-meta.lock"
    lock.write_text(f"{host_name()} {os.getpid()}")  # a live process: this one
    assert main([*TINY, "--no-plots", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another run ({host_name()} {os.getpid()}" in err, err
    assert lock.exists() and sorted(p.name for p in out.iterdir()) == [lock.name]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(f"{host_name()} {gone.stdout.strip()}")  # its process ended: a stale lock
    assert main([*TINY, "--no-plots", "--output-dir", str(out)]) == 0
    assert not lock.exists()  # released at the end


def test_a_resumed_run_keeps_its_baseline_and_counts_its_whole_training_time(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--no-plots", "--output-dir", str(out)]
    assert main([*argv[:1], "3", *argv[2:]]) == 0  # --steps 3
    first = json.loads((out / "results.json").read_text())
    assert main(["--resume", "--steps", "6", "--no-progress", "--no-plots", "--output-dir",
                 str(out)]) == 0  # fmt: skip
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["steps"] == 6 and resumed["before"] == first["before"] is not None
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    total = checkpoint["extra"]["fit"]["seconds"]  # both calls' training time
    assert resumed["train_seconds"] >= total > first["train_seconds"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--meta-lr", "0.01"], "--meta-lr 0.01 (the run has 0.001)"),
        (["--algorithm", "metasgd"], "--algorithm metasgd (the run has maml)"),
        (["--hidden", "16"], "--hidden 16 (the run has 8)"),
        (["--steps-per-epoch", "2"], "--steps-per-epoch 2 (the run has 3)"),
        (["--seed", "3"], "--seed 3 (the run has 0)"),
        (["--meta-lr-schedule", "cosine"], "--meta-lr-schedule cosine (the run has None)"),
    ],
)
def test_resume_refuses_changed_settings_and_names_them(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-plots", "--no-baseline", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["--resume", "--steps", "9", *argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "another --output-dir" in err and len(err.splitlines()) == 1, err


def test_resume_refuses_a_budget_below_what_the_run_has_done(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-plots", "--no-baseline", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["--resume", "--steps", "4", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--steps 4: the run in" in err and "has already done 6 steps" in err, err


def test_resume_states_the_settings_it_changes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-plots", "--no-baseline", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    argv = ["--resume", "--steps", "9", "--threads", "2", "--meta-lr", "0.001", "--hidden", "8",
            "--no-progress", "--no-plots", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0  # the same values as the run's are no change
    printed = capsys.readouterr().out
    assert "changed: --threads 2 (was 1), --steps 9 (was 6)" in printed, printed


def test_resume_without_steps_per_epoch_validates_where_an_uninterrupted_run_does(
    tmp_path, monkeypatch
):
    """The epoch length is the configuration's, not derived from the first call's --steps."""
    from functional_meta.checkpoint import load_checkpoint
    from functional_meta.recipes import DEFAULTS

    monkeypatch.setitem(DEFAULTS["sinusoid"], "steps_per_epoch", 5)
    common = ["--meta-batch-size", "4", "--hidden", "8", "--val-tasks", "5", "--test-tasks", "5",
              "--no-progress", "--no-plots", "--no-baseline"]  # fmt: skip
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert main(["--steps", "4", *common, "--output-dir", str(split)]) == 0
    assert main(["--resume", "--steps", "8", "--no-progress", "--no-plots", "--output-dir",
                 str(split)]) == 0  # fmt: skip
    assert main(["--steps", "8", *common, "--output-dir", str(whole)]) == 0

    def validated(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [line["step"] for line in lines if line["kind"] == "validation"]

    assert validated(split) == validated(whole) == [5]
    best = [load_checkpoint(run / "checkpoints" / "best.pt") for run in (split, whole)]
    assert best[0].step == best[1].step == 5
    for name, value in best[1].state.meta_params["params"].items():
        assert torch.equal(best[0].state.meta_params["params"][name], value), name


def test_a_non_finite_update_ends_in_one_line_naming_no_bad_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--meta-lr", "1e39", "--no-plots", "--no-baseline", "--output-dir", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "last good checkpoint" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints" / "last.pt").exists()


def test_data_errors_exit_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FUNCTIONAL_META_DATA", raising=False)
    missing = tmp_path / "nowhere"
    assert (
        main(["--dataset", "omniglot", "--data-dir", str(missing), "--output-dir", str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "bad.pt")]) == 1
    err = capsys.readouterr().err
    assert "bad.pt" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_help_and_error_have_no_traceback():
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "functional_meta", *a], cwd=root,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
    helped = run("train", "--help")
    assert (
        helped.returncode == 0 and "--algorithm" in helped.stdout and "--strategy" in helped.stdout
    )
    failed = run("--algorithm", "nope")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_metasgd_is_evaluated_with_the_steps_it_learned_rates_for():
    from functional_meta.cli.arguments import build_parser as _parser
    from functional_meta.cli.arguments import train_config as _train_config
    from functional_meta.recipes import build

    def resolved(*argv):
        config = _train_config(_parser().parse_args(["train", *argv]))
        build(config, need_training=False)
        return config["eval_inner_steps"]

    assert resolved("--algorithm", "metasgd", "--inner-steps", "2") == 2
    assert resolved("--algorithm", "metasgd", "--eval-inner-steps", "5") == 5
    assert resolved() == 10


def test_mamlpp_schedule_flags_reach_the_learner(tmp_path):
    """--first-order-epochs switches MAML++ to second order after that many epochs (DA)."""
    out = tmp_path / "mamlpp"
    argv = [*TINY, "--algorithm", "mamlpp", "--inner-steps", "2", "--msl-epochs", "1",
            "--first-order-epochs", "1", "--no-plots", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    order = [s["first_order"] for s in steps if s["kind"] == "step"]
    assert order == [1.0] * 3 + [0.0] * 3
    config = json.loads((out / "config.json").read_text())
    assert config["msl_epochs"] == 1 and config["first_order_epochs"] == 1


def test_a_cosine_meta_rate_keeps_the_horizon_its_run_started_with(tmp_path):
    """--meta-lr-schedule cosine anneals over the run's steps at its start; a run resumed
    with a longer budget keeps that schedule rather than stretching it."""
    from functional_meta.checkpoint import load_checkpoint
    from functional_meta.recipes import build
    from functional_meta.steps import cosine_meta_optimizer

    out = tmp_path / "run"
    assert main([*QUICK, "--meta-lr-schedule", "cosine", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["meta_lr_decay_steps"] == 6
    assert main(["--resume", "--steps", "9", "--no-progress", "--no-plots", "--output-dir",
                 str(out)]) == 0  # fmt: skip
    config = load_checkpoint(out / "checkpoints" / "last.pt").config
    assert (config["steps"], config["meta_lr_decay_steps"]) == (9, 6)
    built = build(dict(config), need_training=False).optimizer
    expected = cosine_meta_optimizer(config["meta_lr"], 6)
    params = {"w": torch.zeros(3)}
    state, reference = built.init(params), expected.init(params)
    for t in range(9):  # past the horizon the rate stays at its floor
        grads = {"w": torch.tensor([1.0, -2.0, 0.5]) * (t + 1)}
        update, state = built.update(grads, state, params)
        wanted, reference = expected.update(grads, reference, params)
        torch.testing.assert_close(update, wanted, rtol=0, atol=0)


QUICK = [*TINY, "--no-baseline", "--no-plots"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_version_comes_from_the_package(capsys):
    import functional_meta

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"functional-meta {functional_meta.__version__}"


def test_a_stopped_run_leaves_its_config_and_metrics_and_resumes_without_repeats(
    tmp_path, monkeypatch, capsys
):
    """Interrupted at step 4 (after the epoch-end checkpoint of step 3): config.json and the
    metrics of steps 1-4 are there; --resume continues from step 3 and logs 4 once."""
    import functional_meta.training as training

    real_fit = training.fit

    def interrupted(*args, **kwargs):
        def stop(event, record, state):
            if event == "step" and record["step"] == 4:
                raise KeyboardInterrupt

        return real_fit(*args, **kwargs, callback=stop)

    out = tmp_path / "run"
    monkeypatch.setattr(training, "fit", interrupted)
    assert main([*QUICK, "--output-dir", str(out)]) == 130
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    assert [r["step"] for r in records(out / "metrics.jsonl") if r["kind"] == "step"] == [
        1,
        2,
        3,
        4,
    ]
    monkeypatch.setattr(training, "fit", real_fit)
    assert main(["--output-dir", str(out), "--resume", "--no-progress", "--no-plots"]) == 0
    steps = [r["step"] for r in records(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()


def test_status_lines_when_not_on_a_terminal(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*QUICK, "--log-every-seconds", "1e-9", "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[:2] for line in err] == [["step", f"{i}/6"] for i in range(1, 7)]
    assert main([*QUICK, "--output-dir", str(tmp_path / "quiet")]) == 0  # 30 s: none here
    assert capsys.readouterr().err == ""


def test_a_config_replays_the_same_run(tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main([*QUICK, "--seed", "3", "--inner-lr", "0.02", "--output-dir", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--output-dir", str(again),
                 "--no-progress", "--no-plots"]) == 0  # fmt: skip
    from functional_meta.cli.arguments import config_keys

    config = json.loads((again / "config.json").read_text())
    assert config == json.loads((first / "config.json").read_text()) | {"output_dir": str(again)}
    assert set(config) == config_keys("sinusoid")  # what --config accepts is what train writes
    for name in ("results.json", "metrics.jsonl"):
        assert (again / name).is_file()
    after = [json.loads((d / "results.json").read_text())["after"] for d in (first, again)]
    assert after[0] == after[1]
    losses = [[r["loss"] for r in records(d / "metrics.jsonl") if r["kind"] == "step"]
              for d in (first, again)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6

    shorter = tmp_path / "shorter"
    assert main(["--config", str(first / "config.json"), "--steps", "3", "--algorithm",
                 "fomaml", "--output-dir", str(shorter), "--no-progress", "--no-plots"]) == 0  # fmt: skip
    config = json.loads((shorter / "config.json").read_text())
    assert (config["steps"], config["algorithm"], config["seed"]) == (3, "fomaml", 3)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a JSON configuration"),
        ('["maml"]', "not a configuration written by functional-meta train"),
        ('{"algorithm": "maml", "dataset": "sinusoid", "bogus": 1}', "unknown keys ['bogus']"),
        ('{"algorithm": "maml", "dataset": "sinusoid", "hidden": [8]}', "hidden must be a plain"),
        ('{"algorithm": "maml", "dataset": "sinusoid", "hidden": 8.5}', "--hidden: invalid int"),
        ('{"algorithm": "nope", "dataset": "sinusoid"}', "invalid choice: 'nope'"),
    ],
)
def test_a_file_that_is_not_a_config_is_refused_in_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(content)
    try:
        status = main(["train", "--config", str(path), "--output-dir", str(tmp_path / "o")])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_config_and_resume_together_are_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"algorithm": "maml", "dataset": "sinusoid"}')
    assert main(["train", "--config", str(path), "--resume"]) == 2
    assert "not both" in capsys.readouterr().err


def test_evaluate_writes_its_result_to_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*QUICK, "--output-dir", str(out)]) == 0
    target = tmp_path / "scores" / "eval.json"
    assert main(["evaluate", str(out), "--test-tasks", "7", "--eval-inner-steps", "2",
                 "--output", str(target)]) == 0  # fmt: skip
    written = json.loads(target.read_text())
    assert written["num_tasks"] == 7 and written["inner_steps"] == 2 and written["step"] == 6
    assert written["checkpoint"].endswith("final.pt") and written["metric"] == "loss"
    assert written["mean"] == written["result"]["loss"] and written["ci95"] > 0
    assert f"{written['mean']:.4f} ± {written['ci95']:.4f}" in capsys.readouterr().out
    assert written["queries"] == 10  # the run's (sinusoid: query points)
    other = tmp_path / "scores" / "q3.json"
    assert main(["evaluate", str(out), "--test-tasks", "7", "--queries", "3",
                 "--output", str(other)]) == 0  # fmt: skip
    assert "7 tasks of 3 query points" in capsys.readouterr().out
    scored = json.loads(other.read_text())
    assert scored["queries"] == 3 and scored["mean"] != written["mean"]


def test_tensorboard_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*QUICK, "--tensorboard", "--output-dir", str(tmp_path / "no")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'functional-meta[tensorboard]'" in err and len(err.splitlines()) == 1
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    assert main([*QUICK, "--tensorboard", "--output-dir", str(tmp_path / "tb")]) == 0
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_omniglot_runs_use_the_shared_cache_not_one_per_run_directory(tmp_path, monkeypatch):
    import functional_meta.data
    from functional_meta.cli.arguments import build_parser, train_config
    from functional_meta.recipes import build

    given = []

    def load_omniglot(root, split, **options):
        given.append(options["cache_dir"])
        raise RuntimeError("enough")

    monkeypatch.setattr(functional_meta.data, "load_omniglot", load_omniglot)
    argv = ["train", "--dataset", "omniglot", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(RuntimeError, match="enough"):
        build(train_config(build_parser().parse_args(argv)))
    assert given == [None]  # load_omniglot's default: data.default_cache_dir()
    with pytest.raises(RuntimeError, match="enough"):
        build(train_config(build_parser().parse_args([*argv, "--cache-dir", "elsewhere"])))
    assert given == [None, "elsewhere"]


def test_train_ways_shapes_the_training_tasks_only_and_keeps_the_seeded_weights(
    tmp_path, monkeypatch
):
    """``--train-ways`` (Snell et al.'s higher-way training of Prototypical Networks): the
    training tasks are ``train_ways``-way, validation and test tasks ``--ways``-way, and
    checking that the algorithm allows it leaves the run's initial weights those of its
    seed."""
    from types import SimpleNamespace

    import functional_meta.data
    from functional_meta.cli.arguments import build_parser, train_config
    from functional_meta.recipes import build

    fake = SimpleNamespace(images=torch.rand(40 * 3, 1, 28, 28),
                           labels=torch.arange(40).repeat_interleave(3))  # fmt: skip
    monkeypatch.setattr(functional_meta.data, "load_omniglot", lambda root, split, **_: fake)
    argv = ["train", "--dataset", "omniglot", "--algorithm", "protonets", "--queries", "2",
            "--meta-batch-size", "2", "--val-tasks", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    plain = build(train_config(build_parser().parse_args(argv)))
    wide = build(train_config(build_parser().parse_args([*argv, "--train-ways", "12"])))
    batch = wide.sample(torch.Generator().manual_seed(0))
    assert batch.support_x.shape[:2] == (2, 12) and batch.query_x.shape[:2] == (2, 24)
    assert plain.sample(torch.Generator().manual_seed(0)).support_x.shape[:2] == (2, 5)
    for tasks in (wide.val_tasks, wide.test_tasks(4)):
        assert next(iter(tasks)).support_x.shape[:2] == (2, 5)
    assert plain.params.keys() == wide.params.keys()
    for name, value in plain.params.items():
        assert torch.equal(value, wide.params[name]), name
