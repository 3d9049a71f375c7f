"""Arguments of the command line: the parser, the dataset defaults filled in, and the checks
that turn a bad value into one line naming the option (exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NoReturn

import torch

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
    check_train_ways,
    total_steps,
)
from functional_meta.steps import META_LR_SCHEDULES

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
    group.add_argument("--train-ways", type=int,
                       help="omniglot: classes per training task (default --ways; validation and "
                       "test keep --ways), for an algorithm without a classifier in its "
                       "meta-parameters (protonets: 60 in Snell et al.)")  # fmt: skip
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
    group.add_argument("--meta-lr-schedule", choices=META_LR_SCHEDULES,
                       help="constant, or cosine: annealed from --meta-lr to 1/100 of it over "
                       "--meta-lr-decay-steps (default: the algorithm's; cosine for mamlpp)")  # fmt: skip
    group.add_argument("--meta-lr-decay-steps", type=int,
                       help="with --meta-lr-schedule cosine: its horizon in meta-updates "
                       "(default: the run's steps when it starts; kept on --resume)")  # fmt: skip
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
    group.add_argument("--damping", type=float,
                       help="iMAML: δ >= 0 in the system (1 + δ) I + H/(λ + μ) (default 0)")  # fmt: skip
    group.add_argument("--hessian-damping", type=float,
                       help="iMAML: μ >= 0 in the system (1 + δ) I + H/(λ + μ) (default 0; "
                       "the authors' code: δ = 1, μ = 10)")  # fmt: skip
    group = train.add_argument_group("budget")
    group.add_argument("--steps", type=int, help="meta-updates in total (sinusoid: 5000)")
    group.add_argument("--epochs", type=int, help="epochs instead of --steps")
    group.add_argument("--steps-per-epoch", type=int,
                       help="meta-updates per epoch (sinusoid 500, omniglot 1000)")  # fmt: skip
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
    group.add_argument("--chunk-size", type=chunk_size,
                       help="vmap this many tasks at a time, or auto: as many as a memory "
                       "budget allows (measured once per model and task shape)")  # fmt: skip
    group.add_argument("--threads", type=int, help="torch CPU threads (sinusoid default: 1)")
    group.add_argument(
        "--output-dir",
        help="default: runs/default, or runs/<dataset>-<algorithm> when either is given",
    )
    group.add_argument("--resume", action="store_true",
                       help="continue OUTPUT_DIR/checkpoints/last.pt with its settings (only "
                       "--steps/--epochs, --device, --threads and the data paths may change)")  # fmt: skip
    group.add_argument("--overwrite", action="store_true",
                       help="replace the previous run in OUTPUT_DIR (refused without it)")  # fmt: skip
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
    evaluate.add_argument("--queries", type=int,
                          help="query examples per class of the test tasks (sinusoid: points; "
                          "default: the run's)")  # fmt: skip
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


# Integer options and the least value each accepts (None: unset, where allowed).
COUNTS = {"shots": 1, "queries": 1, "inner_steps": 1, "meta_batch_size": 1, "steps_per_epoch": 1,
          "test_tasks": 1, "hidden": 1, "steps": 1, "epochs": 1, "val_every": 1, "patience": 1,
          "chunk_size": 1, "threads": 1, "eval_inner_steps": 0, "val_tasks": 0,
          "cg_steps": 1, "meta_lr_decay_steps": 1, "train_ways": 2}  # fmt: skip
REQUIRED = ("shots", "queries", "inner_steps", "meta_batch_size", "steps_per_epoch", "test_tasks",
            "hidden")  # fmt: skip
# What a resumed run may change: its budget, where it runs, where its data lives.
RESUMABLE = ("steps", "epochs", "device", "threads", "data_dir", "cache_dir")
# Options that are not settings of the run (never compared on resume).
_NOT_SETTINGS = ("command", "resume", "overwrite", "output_dir", "no_progress", "no_plots",
                 "no_baseline", "config", "log_every_seconds", "tensorboard")  # fmt: skip


def chunk_size(text: str) -> int | str:
    """``--chunk-size``: an integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def option(key: str) -> str:
    """The command-line spelling of a configuration key: ``meta_lr`` -> ``--meta-lr``."""
    return "--" + key.replace("_", "-")


def check_counts(config: dict[str, Any]) -> None:
    """Every integer option at or above its least value (:data:`COUNTS`), naming it."""
    for key, minimum in COUNTS.items():
        value = config.get(key)
        if (value is None and key not in REQUIRED) or value == "auto":  # --chunk-size auto
            continue
        if value is None or value < minimum:
            raise UsageError(f"{option(key)} must be >= {minimum}, got {value}")


def check_device(device: str) -> None:
    """``device`` must name a device of this machine: ``cpu``, ``cuda``/``cuda:N`` where CUDA
    is available (N below the number of GPUs), ``mps`` where Metal is."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device: {device!r} is not a device (expected cpu, cuda or cuda:N)"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(
                f"--device {device}: CUDA is not available on this machine; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(
                f"--device {device}: MPS is not available on this machine; use --device cpu"
            )
    elif parsed.type != "cpu":
        raise UsageError(
            f"--device: {device!r} is not supported (expected cpu, cuda, cuda:N or mps)"
        )


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` must be a directory or creatable as one: not empty, not a file, and
    under no file (checked before anything runs, not when the first checkpoint is written)."""
    if not str(output_dir).strip():
        raise UsageError("--output-dir must name a directory, got ''")
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output-dir {output_dir}: {path} is a file, not a directory")


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a value no run can use, naming the option; returns ``config``."""
    check_counts(config)
    for key in ("inner_lr", "meta_lr", "clip", "inner_clip", "min_delta", "msl_epochs",
                "first_order_epochs", "regularization", "damping", "hessian_damping"):  # fmt: skip
        if config.get(key) is not None and not math.isfinite(config[key]):
            raise UsageError(f"{option(key)} must be a finite number, got {config[key]}")
    if config["dataset"] == "omniglot" and config["ways"] < 2:
        raise UsageError(f"--ways must be >= 2 for classification, got {config['ways']}")
    for key in ("inner_lr", "meta_lr"):
        if not config[key] > 0:
            raise UsageError(f"{option(key)} must be a positive number, got {config[key]}")
    for key in ("clip", "inner_clip", "regularization"):
        if config.get(key) is not None and not config[key] > 0:
            raise UsageError(f"{option(key)} must be positive, got {config[key]}")
    for key in ("min_delta", "damping", "hessian_damping"):
        if config.get(key) is not None and config[key] < 0:
            raise UsageError(f"{option(key)} must be >= 0, got {config[key]}")
    if config.get("meta_lr_decay_steps") is not None and config.get("meta_lr_schedule") != "cosine":
        raise UsageError(
            "--meta-lr-decay-steps is the horizon of --meta-lr-schedule cosine; give both"
        )
    if config["patience"] is not None and config["val_tasks"] == 0:
        raise UsageError("--patience needs validation tasks (--val-tasks > 0)")
    check_device(config["device"])
    check_output_dir(config["output_dir"])
    if not -(2**63) <= config["seed"] < 2**64:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**64), got {config['seed']}")
    try:
        algorithm_options(config)
        if config["dataset"] == "omniglot":
            check_train_ways(config)
    except ValueError as error:
        raise UsageError(f"--{str(error).replace('_', '-', 1)}") from None
    msl, first_order = config["msl_epochs"], config["first_order_epochs"]
    if msl is not None and not msl > 0:
        raise UsageError(f"--msl-epochs must be a finite number > 0, got {msl}")
    if first_order is not None and not first_order >= 0:
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
    check_counts(config)  # before the division below
    if config["epochs"] is None and config["steps"] is not None:
        config["epochs"] = max(1, math.ceil(config["steps"] / config["steps_per_epoch"]))


# The settings whose defaults do not depend on the dataset (None: unset).
COMMON_DEFAULTS: dict[str, Any] = dict(
    epochs=None, seed=0, device="cpu", chunk_size=None, clip=None, inner_clip=None,
    val_every=None, patience=None, min_delta=0.0, data_dir=None, cache_dir=None,
    msl_epochs=None, first_order_epochs=None, inner_optimizer="sgd", regularization=None,
    cg_steps=None, damping=None, hessian_damping=None, meta_lr_schedule=None,
    meta_lr_decay_steps=None,
)  # fmt: skip


def config_keys(dataset: str | None = None) -> set[str]:
    """The keys of a configuration written by ``train`` (its ``config.json``) for
    ``dataset`` (``None``: for any dataset)."""
    names = DATASETS if dataset is None else (dataset,)
    datasets = set().union(*(DEFAULTS[d] for d in names))
    return {"algorithm", "dataset", "output_dir"} | datasets | COMMON_DEFAULTS.keys()


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The full configuration of a new run: the dataset's defaults, then the given options.
    The epoch length is the dataset's unless ``--steps-per-epoch`` is given (never derived
    from the budget, so a run continued with ``--resume --steps N`` validates at the same
    steps as one started with ``--steps N``)."""
    dataset = args.dataset or "sinusoid"
    for key in ("ways", "train_ways"):  # ways 1: what a sinusoid config.json holds
        if dataset == "sinusoid" and getattr(args, key, None) not in (None, 1):
            raise UsageError(
                f"{option(key)}: the sinusoid task is a regression and has no classes; drop "
                f"{option(key)} (--shots and --queries set the points per task)"
            )
    for key in ("data_dir", "cache_dir"):
        if dataset == "sinusoid" and getattr(args, key) is not None:
            raise UsageError(
                f"{option(key)}: the sinusoid tasks are generated, no data is read; drop it"
            )
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
    apply_budget(config, args)
    if config["meta_lr_schedule"] == "cosine" and config["meta_lr_decay_steps"] is None:
        # Fixed now, so a run resumed with a longer budget keeps the schedule it started with.
        config["meta_lr_decay_steps"] = total_steps(config)
    config["output_dir"] = args.output_dir or default_output_dir(args)
    return check_config(config)


def resume_config(
    saved: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    """The configuration of a resumed run: the checkpoint's ``saved`` settings with the
    given budget, device, threads and data paths (:data:`RESUMABLE`). Any other option given
    must equal the saved value: a changed hyperparameter, algorithm, data set or model shape
    is refused naming each difference. Returns ``(config, changes)``, ``changes`` the
    ``"--option new (was old)"`` of what the command line changed."""
    config, changes, differs = dict(saved), [], []
    for key, value in sorted(vars(args).items()):
        if key in _NOT_SETTINGS or value is None or value is False or key in ("steps", "epochs"):
            continue
        if key in RESUMABLE:
            if saved.get(key) != value:
                changes.append(f"{option(key)} {value} (was {saved.get(key)})")
            config[key] = value
        elif saved.get(key) != value:
            differs.append(f"{option(key)} {value} (the run has {saved.get(key)})")
    if differs:
        raise UsageError(
            f"--resume: the run in {saved.get('output_dir')} was trained with other settings: "
            f"{', '.join(differs)}. A resumed run keeps its settings (only --steps/--epochs, "
            "--device, --threads, --data-dir and --cache-dir may change): drop those options, "
            "or start a new run with another --output-dir"
        )
    budget = {"steps": config.get("steps"), "epochs": config.get("epochs")}
    apply_budget(config, args)
    for key, old in budget.items():
        if getattr(args, key) is not None and config.get(key) != old:
            changes.append(f"{option(key)} {config[key]} (was {old})")
    return check_config(config), changes
