"""What the command line prints and writes besides checkpoints: score tables, JSON files, figures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def score_text(config: dict[str, Any], result: Any) -> str:
    """``mean ± 95% interval``: accuracy in percent for classification, else the loss."""
    if config["dataset"] == "omniglot" and result.accuracy is not None:
        return f"{100 * result.accuracy:.2f}% ± {100 * result.accuracy_ci:.2f}%"
    return f"{result.loss:.4f} ± {result.loss_ci:.4f}"


def test_scores(config: dict[str, Any], experiment: Any, state: Any, tasks: Any) -> dict[int, Any]:
    """Scores on ``tasks`` after 0, 1 and the configured number of inner steps (0 only
    when that is 0: an algorithm without an inner loop)."""
    from functional_meta.evaluation import evaluate

    configured = config["eval_inner_steps"]
    steps = sorted({0, min(1, configured), configured})
    return {
        k: evaluate(experiment.algorithm, state, tasks, steps=k, device=config["device"])
        for k in steps
    }


def scores_of(saved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Scores saved as JSON (``EvaluationResult.as_dict`` per inner-step count) back as
    objects :func:`print_table` and :func:`score_text` read."""
    return {k: SimpleNamespace(**v) for k, v in saved.items()}


def print_table(config: dict[str, Any], rows: dict[str, dict[int, Any]]) -> None:
    """One row of scores per label, one column per number of inner steps."""
    metric = "accuracy" if config["dataset"] == "omniglot" else "MSE"
    first = next(iter(rows.values()))
    count = next(iter(first.values())).num_tasks
    print(f"test {metric} on {count} fixed tasks after k inner steps (mean ± 95% interval):")
    header = "".join(f"{f'k = {k}':>22}" for k in first)
    print(f"{'':24}{header}")
    for label, scores in rows.items():
        print(f"{label:24}" + "".join(f"{score_text(config, r):>22}" for r in scores.values()))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    from functional_meta.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))


def write_plots(
    config: dict[str, Any], experiment: Any, state: Any, history: Any, out: Path
) -> None:
    """Learning curves (and, for the sinusoid, fits) as PNGs; skipped without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'functional-meta[plots]')")
        return
    from functional_meta.plots import plot_learning_curves, plot_sinusoid

    written = [plot_learning_curves(history, out / "learning_curves.png")]
    if config["dataset"] == "sinusoid":
        written.append(plot_sinusoid(
            experiment.algorithm, state, out / "sinusoid.png", support=config["shots"],
            steps=sorted({0, 1, config["eval_inner_steps"]}),
            title=f"{config['algorithm']} after {history.steps[-1]['step'] if history.steps else 0} meta-updates",
        ))  # fmt: skip
    print("figures: " + ", ".join(str(p) for p in written))
