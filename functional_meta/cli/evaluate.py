"""``functional-meta evaluate``: score a checkpoint on the test tasks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from functional_meta.cli.arguments import PROG, UsageError, check_device
from functional_meta.cli.report import score_text, write_json
from functional_meta.cli.train import set_threads
from functional_meta.recipes import build


def evaluation_record(config: dict, result: Any, checkpoint: Path, step: int) -> dict[str, Any]:
    """What ``evaluate --output`` writes: the score's ``mean`` and ``ci95`` (the 95%
    half-width; accuracy for classification, else the loss), the tasks and inner steps, the
    checkpoint and its step, and every number of the result."""
    accuracy = config["dataset"] == "omniglot" and result.accuracy is not None
    return {
        "algorithm": config["algorithm"], "dataset": config["dataset"],
        "metric": "accuracy" if accuracy else "loss",
        "mean": result.accuracy if accuracy else result.loss,
        "ci95": result.accuracy_ci if accuracy else result.loss_ci,
        "num_tasks": result.num_tasks, "queries": config["queries"], "inner_steps": result.steps,
        "checkpoint": str(checkpoint), "step": step, "result": result.as_dict(),
    }  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: load a checkpoint and print mean ± 95% interval on the test tasks."""
    from functional_meta.checkpoint import load_checkpoint
    from functional_meta.evaluation import evaluate

    if not args.checkpoint.strip():
        raise UsageError("checkpoint: expected a run directory or a checkpoint file, got ''")
    path = Path(args.checkpoint)
    if path.is_dir():
        candidates = [path / "checkpoints" / n for n in ("final.pt", "last.pt")] + [
            path / "final.pt",
            path / "last.pt",
        ]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path}: no checkpoints/final.pt or checkpoints/last.pt in this directory"
            )
        path = found[0]
    checkpoint = load_checkpoint(path)
    config = dict(checkpoint.config)
    if "algorithm" not in config or "dataset" not in config:
        raise ValueError(f"{path}: not a checkpoint written by {PROG} train (no configuration)")
    for key in (
        "eval_inner_steps",
        "test_tasks",
        "queries",
        "data_dir",
        "cache_dir",
        "device",
        "strategy",
        "threads",
    ):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config["eval_inner_steps"] < 0 or config["test_tasks"] < 1:
        raise UsageError("--eval-inner-steps must be >= 0 and --test-tasks >= 1")
    if config["queries"] < 1:
        raise UsageError(f"--queries must be >= 1, got {config['queries']}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    check_device(config["device"])
    set_threads(config.get("threads"))
    experiment = build(config, need_training=False)
    from functional_meta.evaluation import state_to

    state = state_to(checkpoint.state, config["device"])
    result = evaluate(experiment.algorithm, state, experiment.test_tasks(config["test_tasks"]),
                      steps=config["eval_inner_steps"], device=config["device"])  # fmt: skip
    metric = "accuracy" if config["dataset"] == "omniglot" else "MSE"
    print(f"{config['algorithm']} on {config['dataset']} ({path}, step {checkpoint.step}): test {metric} "
          f"{score_text(config, result)} ({result.num_tasks} tasks of {config['queries']} "
          f"{'queries per class' if config['dataset'] == 'omniglot' else 'query points'}, "
          f"{result.steps} inner steps, 95% interval)")  # fmt: skip
    if args.output is not None:
        write_json(Path(args.output), evaluation_record(config, result, path, checkpoint.step))
    return 0
