"""The command line, end to end on tiny budgets, and its one-line errors."""

import json
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
    assert "test MSE" in line and "±" in line and "7 tasks, 2 inner steps" in line

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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "bogus"], "invalid choice: 'bogus'"),
        (["--dataset", "omniglot", "--ways", "1"], "--ways must be >= 2"),
        (["--inner-steps", "0"], "--inner-steps must be >= 1"),
        (["--steps", "3", "--epochs", "2"], "not both"),
        (["--patience", "2", "--val-tasks", "0"], "--patience needs validation"),
        (["--msl-epochs", "2"], "--msl-epochs: maml has no option msl_anneal_epochs"),
        (
            ["--algorithm", "mamlpp", "--msl-epochs", "0"],
            "--msl-epochs must be a finite number > 0",
        ),
        (["--algorithm", "mamlpp", "--first-order-epochs", "-1"], "--first-order-epochs must be"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    try:
        status = main([*argv, "--output-dir", str(tmp_path)])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


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
