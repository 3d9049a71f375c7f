"""The command line: ``python -m functional_meta`` (or the ``functional-meta`` script).

``functional-meta`` with no arguments runs ``train`` with its defaults: MAML on the
sinusoid task (MLP 1-40-40-1, K = 10, inner lr 0.01, meta-batch 25, Adam 1e-3), printing
the test MSE on 600 fixed tasks after 0, 1 and 10 inner steps before and after
meta-training, and leaving checkpoints, metrics and figures in ``runs/default``.

Under ``torchrun --nproc_per_node=N -m functional_meta train ...`` training runs
data-parallel over tasks (see :mod:`functional_meta.distributed` and docs/scaling.md): each
rank takes its share of every meta-batch, meta-gradients and metrics are averaged, and only
rank 0 prints and writes checkpoints, metrics and plots.

``functional-meta evaluate RUN_DIR_OR_CHECKPOINT`` scores a checkpoint on the test tasks.
Bad arguments exit with status 2 and one line on stderr; data and checkpoint errors with
status 1 and one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from functional_meta.algorithms import REGISTRY
from functional_meta.batching import STRATEGIES
from functional_meta.environment import code_version, describe_machine
from functional_meta.recipes import DATASETS, DEFAULTS, algorithm_options, build

PROG = "functional-meta"


class UsageError(ValueError):
    """A bad command-line argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Pure-functional meta-learning on torch.func. With no arguments: "
        "meta-train MAML on the sinusoid task (about a minute on 2 CPU cores).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,evaluate}")
    train = commands.add_parser(
        "train",
        help="meta-train (the default command)",
        description="Meta-train an algorithm and evaluate it on fixed test tasks. Unset "
        "options take the dataset's defaults (sinusoid: Finn et al.'s regression setup; "
        "omniglot: 5-way 1-shot, 15 queries, inner lr 0.4, 1 step (3 at test), meta-batch 32).",
    )
    train.add_argument("--algorithm", choices=sorted(REGISTRY), default=None, help="default: maml")
    train.add_argument("--dataset", choices=DATASETS, default=None, help="default: sinusoid")
    group = train.add_argument_group("tasks")
    group.add_argument("--ways", type=int, help="classes per task (omniglot; default 5)")
    group.add_argument("--shots", type=int, help="support examples per class (sinusoid: points)")
    group.add_argument("--queries", type=int, help="query examples per class (sinusoid: points)")
    group.add_argument("--data-dir", help="Omniglot zips (default: $FUNCTIONAL_META_DATA)")
    group.add_argument("--cache-dir", help="decoded Omniglot cache (default: OUTPUT_DIR/cache)")
    group = train.add_argument_group("algorithm")
    group.add_argument("--inner-steps", type=int, help="inner steps in training")
    group.add_argument("--eval-inner-steps", type=int, help="inner steps at validation and test")
    group.add_argument("--inner-lr", type=float, help="inner learning rate")
    group.add_argument("--meta-lr", type=float, help="Adam learning rate of the meta-update")
    group.add_argument("--meta-batch-size", type=int, help="tasks per meta-update")
    group.add_argument("--clip", type=float, help="clip the meta-gradient's global norm")
    group.add_argument("--inner-clip", type=float, help="clip each inner gradient's norm")
    group.add_argument("--hidden", type=int, help="hidden width (sinusoid 40, omniglot 64)")
    group.add_argument("--msl-epochs", type=float,
                       help="MAML++: epochs of multi-step loss, annealed (default 10)")  # fmt: skip
    group.add_argument("--first-order-epochs", type=float,
                       help="MAML++: first-order epochs before second order (default 50)")  # fmt: skip
    group = train.add_argument_group("budget")
    group.add_argument("--steps", type=int, help="meta-updates in total (sinusoid: 5000)")
    group.add_argument("--epochs", type=int, help="epochs instead of --steps")
    group.add_argument("--steps-per-epoch", type=int, help="meta-updates per epoch")
    group.add_argument("--val-tasks", type=int, help="fixed validation tasks (0: none)")
    group.add_argument("--val-every", type=int, help="validate every N steps (default: per epoch)")
    group.add_argument("--patience", type=int, help="early stopping after N validations")
    group.add_argument("--min-delta", type=float, help="improvement early stopping counts")
    group.add_argument("--test-tasks", type=int, help="fixed test tasks (default 600)")
    group.add_argument("--no-baseline", action="store_true",
                       help="skip scoring the untrained model on the test tasks")  # fmt: skip
    group = train.add_argument_group("execution")
    group.add_argument("--seed", type=int, help="seeds the model and the task generator")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    group.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="task batching: auto (default: loop for conv nets on CPU, else vmap), vmap or loop",
    )
    group.add_argument("--chunk-size", type=int, help="vmap this many tasks at a time")
    group.add_argument("--threads", type=int, help="torch CPU threads (sinusoid default: 1)")
    group.add_argument(
        "--output-dir",
        help="default: runs/default, or runs/<dataset>-<algorithm> when either is given",
    )
    group.add_argument("--resume", action="store_true",
                       help="continue OUTPUT_DIR/checkpoints/last.pt (its settings; a new --steps/--epochs extends it)")  # fmt: skip
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-plots", action="store_true", help="no PNG figures")
    evaluate = commands.add_parser(
        "evaluate",
        help="score a checkpoint on the test tasks",
        description="Adapt on each fixed test task's support set and print the query "
        "score, mean ± 95%% interval over the tasks.",
    )
    evaluate.add_argument("checkpoint", help="a run directory or a checkpoint file")
    evaluate.add_argument("--eval-inner-steps", "--inner-steps", dest="eval_inner_steps",
                          type=int, help="inner steps (default: the run's)")  # fmt: skip
    evaluate.add_argument("--test-tasks", type=int, help="number of test tasks (default 600)")
    evaluate.add_argument("--data-dir", help="Omniglot zips (default: the run's)")
    evaluate.add_argument("--cache-dir", help="decoded Omniglot cache")
    evaluate.add_argument("--device", help="default: the run's")
    evaluate.add_argument("--strategy", choices=STRATEGIES, help="default: the run's")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    return parser


def _default_output_dir(args: argparse.Namespace) -> str:
    """``runs/default`` for the embedded default run, else ``runs/<dataset>-<algorithm>``."""
    if args.dataset is None and args.algorithm is None:
        return os.path.join("runs", "default")
    return os.path.join("runs", f"{args.dataset or 'sinusoid'}-{args.algorithm or 'maml'}")


# -- configuration -------------------------------------------------------------------------
def _check(config: dict[str, Any]) -> dict[str, Any]:
    positive = ["shots", "queries", "inner_steps", "meta_batch_size", "steps_per_epoch",
                "test_tasks", "hidden"]  # fmt: skip
    for key in positive:
        if config[key] is None or config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("steps", "epochs", "val_every", "patience", "chunk_size", "threads"):
        if config.get(key) is not None and config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("eval_inner_steps", "val_tasks"):
        if config[key] is not None and config[key] < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if config["dataset"] == "omniglot" and config["ways"] < 2:
        raise UsageError(f"--ways must be >= 2 for classification, got {config['ways']}")
    for key in ("inner_lr", "meta_lr"):
        if not (config[key] > 0 and math.isfinite(config[key])):
            raise UsageError(
                f"--{key.replace('_', '-')} must be a positive number, got {config[key]}"
            )
    for key in ("clip", "inner_clip"):
        if config.get(key) is not None and not config[key] > 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    if config["min_delta"] < 0:
        raise UsageError(f"--min-delta must be >= 0, got {config['min_delta']}")
    if config["patience"] is not None and config["val_tasks"] == 0:
        raise UsageError("--patience needs validation tasks (--val-tasks > 0)")
    try:
        algorithm_options(config)
    except ValueError as error:
        raise UsageError(f"--{str(error).replace('_', '-', 1)}") from None
    msl, first_order = config["msl_epochs"], config["first_order_epochs"]
    if msl is not None and not (math.isfinite(msl) and msl > 0):
        raise UsageError(f"--msl-epochs must be a finite number > 0, got {msl}")
    if first_order is not None and not (math.isfinite(first_order) and first_order >= 0):
        raise UsageError(f"--first-order-epochs must be a finite number >= 0, got {first_order}")
    return config


def _budget(config: dict[str, Any], given: argparse.Namespace) -> None:
    if given.epochs is not None and given.steps is not None:
        raise UsageError("give --steps or --epochs, not both")
    if given.epochs is not None:
        config["epochs"], config["steps"] = given.epochs, None
    elif given.steps is not None:
        config["steps"], config["epochs"] = given.steps, None
    if config["epochs"] is None and config["steps"] is not None:
        config["epochs"] = max(1, math.ceil(config["steps"] / config["steps_per_epoch"]))


def _train_config(args: argparse.Namespace) -> dict[str, Any]:
    dataset = args.dataset or "sinusoid"
    config: dict[str, Any] = {"algorithm": args.algorithm or "maml", "dataset": dataset}
    config |= dict(DEFAULTS[dataset])
    config |= dict(epochs=None, seed=0, device="cpu", chunk_size=None, clip=None,
                   inner_clip=None, val_every=None, patience=None, min_delta=0.0,
                   data_dir=None, cache_dir=None, msl_epochs=None, first_order_epochs=None)  # fmt: skip
    for key in list(config):
        if key not in ("steps", "epochs") and getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if (
        config["steps_per_epoch"] is not None
        and args.steps_per_epoch is None
        and args.steps is not None
    ):
        config["steps_per_epoch"] = min(config["steps_per_epoch"], args.steps)
    _budget(config, args)
    config["output_dir"] = args.output_dir or _default_output_dir(args)
    return _check(config)


# -- commands ------------------------------------------------------------------------------
def _score_text(config: dict[str, Any], result: Any) -> str:
    if config["dataset"] == "omniglot" and result.accuracy is not None:
        return f"{100 * result.accuracy:.2f}% ± {100 * result.accuracy_ci:.2f}%"
    return f"{result.loss:.4f} ± {result.loss_ci:.4f}"


def _test_scores(config: dict[str, Any], experiment: Any, state: Any, tasks: Any) -> dict[int, Any]:
    from functional_meta.evaluation import evaluate

    steps = sorted({0, 1, config["eval_inner_steps"]})
    return {
        k: evaluate(experiment.algorithm, state, tasks, steps=k, device=config["device"])
        for k in steps
    }


def _print_table(config: dict[str, Any], rows: dict[str, dict[int, Any]]) -> None:
    metric = "accuracy" if config["dataset"] == "omniglot" else "MSE"
    first = next(iter(rows.values()))
    count = next(iter(first.values())).num_tasks
    print(f"test {metric} on {count} fixed tasks after k inner steps (mean ± 95% interval):")
    header = "".join(f"{f'k = {k}':>22}" for k in first)
    print(f"{'':24}{header}")
    for label, scores in rows.items():
        print(f"{label:24}" + "".join(f"{_score_text(config, r):>22}" for r in scores.values()))


def _write_json(path: Path, data: Any) -> None:
    from functional_meta.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))


def _plots(config: dict[str, Any], experiment: Any, state: Any, history: Any, out: Path) -> None:
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


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: meta-train, evaluate before and after, write checkpoints/metrics/plots.
    Under torchrun: join the process group, silence stdout on ranks other than 0."""
    from functional_meta import distributed

    cuda = (args.device or "cpu").startswith("cuda")
    ctx = distributed.init("nccl" if cuda else "gloo")  # a plain process: no group
    try:
        with contextlib.ExitStack() as stack:
            if not ctx.is_main:
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            return _train(args, ctx)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, ctx: Any) -> int:
    from functional_meta import distributed
    from functional_meta.checkpoint import load_checkpoint
    from functional_meta.steps import init_state
    from functional_meta.training import fit, write_metrics

    resume = None
    if args.resume:
        out = Path(args.output_dir or _default_output_dir(args))
        resume = load_checkpoint(out / "checkpoints" / "last.pt")
        config = dict(resume.config)
        if "algorithm" not in config:
            raise ValueError(f"{resume.path}: not a checkpoint written by {PROG} train")
        config["output_dir"] = str(out)
        for key in ("device", "threads"):
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        _budget(config, args)
        _check(config)
    else:
        config = _train_config(args)
    out = Path(config["output_dir"])
    if ctx.device.type == "cuda":
        config["device"] = str(ctx.device)  # nccl: this rank's GPU, cuda:LOCAL_RANK
    if config["meta_batch_size"] % ctx.world_size:
        raise UsageError(
            f"--meta-batch-size {config['meta_batch_size']} does not split evenly over "
            f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
        )
    _set_threads(config["threads"])
    experiment = build(config)
    test_tasks = experiment.test_tasks(config["test_tasks"])
    algorithm = experiment.algorithm
    budget = f"{config['steps']} steps" if config["steps"] else f"{config['epochs']} epochs"
    print(f"{PROG}: {config['algorithm']} on {config['dataset']}, {budget} "
          f"(meta-batch {config['meta_batch_size']}, strategy {config['strategy']}), output {out}")  # fmt: skip
    params = {k: v.to(config["device"]) for k, v in experiment.params.items()}
    buffers = {k: v.to(config["device"]) for k, v in experiment.buffers.items()}
    state = init_state(algorithm, params, buffers, experiment.optimizer)
    state = distributed.broadcast(state)  # identical start on every rank (no-op alone)
    sample = experiment.sample
    if ctx.world_size > 1:  # every rank draws the same meta-batch and keeps its slice

        def sample(generator: torch.Generator) -> Any:
            return distributed.shard(experiment.sample(generator))

    before = None
    if resume is None and not args.no_baseline:
        before = _test_scores(config, experiment, state, test_tasks)
        _print_table(config, {"before meta-training": before})
    started = time.perf_counter()
    result = fit(
        algorithm, state, sample, optimizer=experiment.optimizer, epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"], max_steps=config["steps"],
        generator=torch.Generator().manual_seed(config["seed"]), val_tasks=experiment.val_tasks,
        val_every=config["val_every"], val_steps=config["eval_inner_steps"],
        patience=config["patience"], min_delta=config["min_delta"], clip_norm=config["clip"],
        device=config["device"], progress=False if args.no_progress else None,
        checkpoint_dir=out / "checkpoints", config=config, resume=resume,
        gradient=distributed.data_parallel(algorithm.grad) if ctx.world_size > 1 else None,
        is_main_process=ctx.is_main,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    history = result.history
    print(f"meta-trained {result.progress.step} steps in {seconds:.1f} s ({history.stop_reason})")
    if ctx.is_main:  # only rank 0 writes; the trained state is saved before it is scored
        from functional_meta.checkpoint import save_checkpoint

        save_checkpoint(out / "checkpoints" / "final.pt", result.state, step=result.progress.step,
                        epoch=result.progress.epoch, config=config)  # fmt: skip
        write_metrics(history, out)
        _write_json(out / "config.json", config)
    after = _test_scores(config, experiment, result.state, test_tasks)
    rows = {"before meta-training": before} if before else {}
    _print_table(config, rows | {"after meta-training": after})
    if not ctx.is_main:
        return 0
    _write_json(out / "results.json", {
        "train_seconds": seconds, "steps": result.progress.step, "stop_reason": history.stop_reason,
        "machine": describe_machine(config["device"]), "code": code_version(),
        "before": {k: r.as_dict() for k, r in before.items()} if before else None,
        "after": {k: r.as_dict() for k, r in after.items()},
    })  # fmt: skip
    if not args.no_plots:
        _plots(config, experiment, result.state, history, out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: load a checkpoint and print mean ± 95% interval on the test tasks."""
    from functional_meta.checkpoint import load_checkpoint
    from functional_meta.evaluation import evaluate

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
    _set_threads(config.get("threads"))
    experiment = build(config, need_training=False)
    from functional_meta.evaluation import state_to

    state = state_to(checkpoint.state, config["device"])
    result = evaluate(experiment.algorithm, state, experiment.test_tasks(config["test_tasks"]),
                      steps=config["eval_inner_steps"], device=config["device"])  # fmt: skip
    metric = "accuracy" if config["dataset"] == "omniglot" else "MSE"
    print(f"{config['algorithm']} on {config['dataset']} ({path}, step {checkpoint.step}): test {metric} "
          f"{_score_text(config, result)} ({result.num_tasks} tasks, {result.steps} inner steps, 95% interval)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m functional_meta`` and ``functional-meta``; returns the
    exit status (0 success, 1 a data/checkpoint/numerical error, 2 a bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate", "-h", "--help"):
        argv.insert(0, "train")
    args = _parser().parse_args(argv)
    from functional_meta.validation import NonFiniteError

    try:
        return cmd_train(args) if args.command == "train" else cmd_evaluate(args)
    except UsageError as error:
        print(f"{PROG}: error: {error} (see {PROG} {args.command} --help)", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, KeyError, NonFiniteError) as error:
        if os.environ.get("FUNCTIONAL_META_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
