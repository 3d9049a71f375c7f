"""examples/time_to_accuracy.py renders its tables from the committed run records alone."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def example(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "time_to_accuracy", ROOT / "examples" / "time_to_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECORDS", tmp_path)
    return module


def record(root, name, config, scores, budget=30):
    """A run record: ``scores`` are ``(step, cpu_minutes, accuracy)``."""
    out = root / name
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"queries": 2, "meta_batch_size": 16, "meta_lr": 1e-3, **config})
    )
    (out / "command.txt").write_text(f"python examples/time_to_accuracy.py --name {name} "
                                     f"--budget-minutes {budget}\n")  # fmt: skip
    lines = [dict(step=s, cpu_seconds=m * 60, wall_seconds=m * 60, accuracy=a, accuracy_ci=0.5,
                  tasks=600, train_loss=1.0) for s, m, a in scores]  # fmt: skip
    (out / "curve.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_long_runs_are_read_off_at_fixed_budgets_and_short_ones_are_not(example, tmp_path):
    record(tmp_path, "long", dict(algorithm="maml", ways=5),
           [(200, 10, 90.0), (400, 29, 95.0), (600, 31, 96.0), (800, 61, 97.5)], budget=90)  # fmt: skip
    record(tmp_path, "short", dict(algorithm="maml", ways=5), [(200, 12, 91.0)])
    lines = example.at_budgets()
    assert lines[2] == "| run | 15 min | 30 min | 60 min | published |"
    rows = [line for line in lines if line.startswith("| long")]
    assert rows == ["| long | 90.00% (step 200) | 95.00% (step 400) | 96.00% (step 600) | "
                    f"{example.PUBLISHED[('vinyals', 5)]} |"]  # fmt: skip
    assert not any(line.startswith("| short") for line in lines)


def test_the_lake_table_lists_only_lake_runs_best_first_with_error_rates(example, tmp_path):
    record(tmp_path, "a", dict(algorithm="maml", ways=20, protocol="lake"), [(200, 12, 64.0)])
    record(tmp_path, "b", dict(algorithm="protonets", ways=20, protocol="lake"), [(200, 14, 68.5)])
    record(tmp_path, "c", dict(algorithm="maml", ways=20, protocol="vinyals"), [(200, 12, 84.0)])
    rows = [line for line in example.lake_table() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| b", "| a"]
    assert rows[1].endswith("| 68.50% ± 0.50% | 31.5% |")
    assert "Commands:" in example.report() and "| c | vinyals |" in example.report()


def test_tuning_trials_are_compared_at_fixed_budgets_apart_from_the_test_records(
    example, tmp_path, monkeypatch
):
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    monkeypatch.setattr(example, "TUNING", tuning)
    record(tuning, "mb16", dict(algorithm="maml", ways=5, meta_batch_size=16, meta_lr=0.001,
                                inner_steps=1, inner_lr=0.4), [(200, 4, 80.0), (400, 11, 90.0)])  # fmt: skip
    record(tmp_path, "a-test-run", dict(algorithm="maml", ways=5), [(200, 12, 91.0)])
    table = example.tuning_report()
    header, _, row, *_ = table.splitlines()
    assert header.endswith("| validation at 8 min | validation at 10 min | at the end | CPU min "
                           "| steps |")  # fmt: skip
    assert row == ("| mb16 | maml | 5 | 2 | 16 | 0.001 | 1 | 0.4 | — | 80.00% (step 200) "
                   "| 80.00% (step 200) | 80.00% (step 200) | 80.00% (step 200) "
                   "| 90.00% ± 0.50% | 11.0 | 400 |")  # fmt: skip
    assert "a-test-run" not in table


def test_a_run_that_stopped_early_has_no_score_at_later_budgets(example):
    curve = [dict(step=100, cpu_seconds=120.0, accuracy=80.0)]
    assert example.score_at(curve, 2) == "80.00% (step 100)"
    assert example.score_at(curve, 8) == "—"


def test_the_meta_rate_column_names_a_schedule_and_its_horizon(example):
    maml = dict(algorithm="maml", meta_lr=1e-3, steps=100_000)
    assert example.meta_rate(maml) == "0.001"  # a record from before the option
    assert example.meta_rate({**maml, "meta_lr_schedule": "constant"}) == "0.001"
    cosine = {**maml, "meta_lr_schedule": "cosine", "meta_lr_decay_steps": 6000}
    assert example.meta_rate(cosine) == "0.001 → 1e-05 (cosine, 6000 steps)"
    # MAML++'s own schedule anneals over the run's steps (its --max-steps there)
    assert example.meta_rate({**maml, "algorithm": "mamlpp"}) == (
        "0.001 → 1e-05 (cosine, 100000 steps)"
    )


def test_the_ways_column_names_the_training_tasks_ways_where_they_differ(example, tmp_path):
    assert example.ways_shown(dict(ways=5)) == "5"  # a record from before the option
    assert example.ways_shown(dict(ways=5, train_ways=None)) == "5"
    assert example.ways_shown(dict(ways=20, train_ways=60)) == "20 (60 in training)"
    record(tmp_path, "wide", dict(algorithm="protonets", ways=5, train_ways=60), [(500, 2, 96.0)])
    row = next(line for line in example.report().splitlines() if line.startswith("| wide"))
    assert row.startswith("| wide | vinyals | 5 (60 in training) | 2 | 16 |")


def test_a_run_scored_again_with_other_queries_is_listed_beside_its_own_score(example, tmp_path):
    record(tmp_path, "plain", dict(algorithm="maml", ways=5), [(500, 2, 95.0)])
    record(tmp_path, "again", dict(algorithm="protonets", ways=5, queries=5), [(800, 20, 98.5)])
    (tmp_path / "again" / "test-q15.json").write_text(
        json.dumps(dict(mean=0.9864, ci95=0.0017, queries=15, step=800))
    )
    lines = example.rescored()
    assert lines[2] == "| run | its last test score | scored again |"
    assert lines[4:] == [
        "| again | 98.50% ± 0.50% (5 queries, step 800) | 98.64% ± 0.17% (15 queries, step 800) |"
    ]
    assert "| again | 98.50%" in example.report()
