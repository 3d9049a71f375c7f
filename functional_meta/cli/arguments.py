"""Arguments of the command line: the parser, the dataset defaults filled in, and the checks
that turn a bad value into one line naming the option (exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, NoReturn

from functional_meta import __version__
from functional_meta.algorithms import REGISTRY
from functional_meta.batching import STRATEGIES
from functional_meta.recipes import (
    DATASETS,
    DEFAULTS,
    INNER_OPTIMIZERS,
    PROTOCOL_DEFAULTS,
    PROTOCOLS,
    algorithm_options,
)

PROG = "functional-meta"


class UsageError(ValueError):
    """A bad command-line argument (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error and exit status 2 of the rest of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` and ``evaluate`` commands and their options."""
    parser = Parser(
        prog=PROG,
        description="Pure-functional meta-learning on torch.func. With no arguments: "
        "meta-train MAML on the sinusoid task (about a minute on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
    train.add_argument("--config", metavar="FILE",
                       help="repeat a run: its config.json's settings, overridden by the options given")  # fmt: skip
    group = train.add_argument_group("tasks")
    group.add_argument("--ways", type=int, help="classes per task (omniglot; default 5)")
    group.add_argument("--shots", type=int, help="support examples per class (sinusoid: points)")
    group.add_argument("--queries", type=int, help="query examples per class (sinusoid: points)")
    group.add_argument("--protocol", choices=PROTOCOLS,
                       help="omniglot: vinyals (default; 1200/423 characters) or lake (background "
                       "set only, 20-way within one alphabet of the evaluation set, support and "
                       "query by different drawers)")  # fmt: skip
    group.add_argument("--data-dir", help="Omniglot zips (default: $FUNCTIONAL_META_DATA)")
    group.add_argument("--cache-dir", help="decoded Omniglot cache (default: $FUNCTIONAL_META_CACHE, "
                       "else $XDG_CACHE_HOME/functional_meta, else ~/.cache/functional_meta)")  # fmt: skip
    group = train.add_argument_group("algorithm")
    group.add_argument("--inner-steps", type=int, help="inner steps in training")
    group.add_argument("--eval-inner-steps", type=int, help="inner steps at validation and test")
    group.add_argument("--inner-lr", type=float, help="inner learning rate")
    group.add_argument("--inner-optimizer", choices=INNER_OPTIMIZERS,
                       help="inner update at --inner-lr: sgd (plain, default), momentum (0.9) "
                       "or adam (betas 0.9, 0.999; eps 1e-8); not with metasgd, mamlpp")  # fmt: skip
    group.add_argument("--meta-lr", type=float, help="Adam learning rate of the meta-update")
    group.add_argument("--meta-batch-size", type=int, help="tasks per meta-update")
    group.add_argument("--clip", type=float, help="clip the meta-gradient's global norm")
    group.add_argument("--inner-clip", type=float, help="clip each inner gradient's norm")
    group.add_argument("--hidden", type=int, help="hidden width (sinusoid 40, omniglot 64)")
    group.add_argument("--msl-epochs", type=float,
                       help="MAML++: epochs of multi-step loss, annealed (default 10)")  # fmt: skip
    group.add_argument("--first-order-epochs", type=float,
                       help="MAML++: first-order epochs before second order (default 50)")  # fmt: skip
    group.add_argument("--regularization", type=float,
                       help="iMAML: strength λ of the proximal term (default 1)")  # fmt: skip
    group.add_argument("--cg-steps", type=int,
                       help="iMAML: conjugate-gradient steps per task (default 5)")  # fmt: skip
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
    group.add_argument("--log-every-seconds", type=float, default=30.0, metavar="N",
                       help="without a progress bar, print a status line every N seconds (0: never; default 30)")  # fmt: skip
    group.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard (needs the tensorboard package)")  # fmt: skip
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
    evaluate.add_argument("--cache-dir", help="decoded Omniglot cache (default: the run's)")
    evaluate.add_argument("--device", help="default: the run's")
    evaluate.add_argument("--strategy", choices=STRATEGIES, help="default: the run's")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.add_argument("--output", metavar="FILE",
                          help="also write the result as JSON to FILE (written atomically)")  # fmt: skip
    return parser


def default_output_dir(args: argparse.Namespace) -> str:
    """``runs/default`` for the embedded default run, else ``runs/<dataset>-<algorithm>``."""
    if args.dataset is None and args.algorithm is None:
        return os.path.join("runs", "default")
    return os.path.join("runs", f"{args.dataset or 'sinusoid'}-{args.algorithm or 'maml'}")


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a value no run can use, naming the option; returns ``config``."""
    positive = ["shots", "queries", "inner_steps", "meta_batch_size", "steps_per_epoch",
                "test_tasks", "hidden"]  # fmt: skip
    for key in positive:
        if config[key] is None or config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("steps", "epochs", "val_every", "patience", "chunk_size", "threads", "cg_steps"):
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
    for key in ("clip", "inner_clip", "regularization"):
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


def apply_budget(config: dict[str, Any], given: argparse.Namespace) -> None:
    """Set ``steps``/``epochs`` from the given ``--steps`` or ``--epochs`` (one of them)."""
    if given.epochs is not None and given.steps is not None:
        raise UsageError("give --steps or --epochs, not both")
    if given.epochs is not None:
        config["epochs"], config["steps"] = given.epochs, None
    elif given.steps is not None:
        config["steps"], config["epochs"] = given.steps, None
    if config["epochs"] is None and config["steps"] is not None:
        config["epochs"] = max(1, math.ceil(config["steps"] / config["steps_per_epoch"]))


# The settings whose defaults do not depend on the dataset (None: unset).
COMMON_DEFAULTS: dict[str, Any] = dict(
    epochs=None, seed=0, device="cpu", chunk_size=None, clip=None, inner_clip=None,
    val_every=None, patience=None, min_delta=0.0, data_dir=None, cache_dir=None,
    msl_epochs=None, first_order_epochs=None, inner_optimizer="sgd", regularization=None,
    cg_steps=None,
)  # fmt: skip


def config_keys(dataset: str | None = None) -> set[str]:
    """The keys of a configuration written by ``train`` (its ``config.json``) for
    ``dataset`` (``None``: for any dataset)."""
    names = DATASETS if dataset is None else (dataset,)
    datasets = set().union(*(DEFAULTS[d] for d in names))
    return {"algorithm", "dataset", "output_dir"} | datasets | COMMON_DEFAULTS.keys()


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The full configuration of a new run: the dataset's defaults, then the given options."""
    dataset = args.dataset or "sinusoid"
    config: dict[str, Any] = {"algorithm": args.algorithm or "maml", "dataset": dataset}
    config |= dict(DEFAULTS[dataset])
    if args.protocol is not None:
        if "protocol" not in config:
            raise UsageError(f"--protocol is for omniglot; {dataset} has no protocols")
        config |= PROTOCOL_DEFAULTS[args.protocol]
    config |= COMMON_DEFAULTS
    for key in list(config):
        if key not in ("steps", "epochs") and getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if (
        config["steps_per_epoch"] is not None
        and args.steps_per_epoch is None
        and args.steps is not None
    ):
        config["steps_per_epoch"] = min(config["steps_per_epoch"], args.steps)
    apply_budget(config, args)
    config["output_dir"] = args.output_dir or default_output_dir(args)
    return check_config(config)
