"""``functional-meta train``: meta-train, score before and after, write the run directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from functional_meta.cli.arguments import (
    PROG,
    UsageError,
    check_output_dir,
    default_output_dir,
    resume_config,
    train_config,
)
from functional_meta.cli.report import (
    print_table,
    scores_of,
    test_scores,
    write_json,
    write_plots,
)
from functional_meta.environment import code_version, describe_machine
from functional_meta.files import LockedError, process_lock
from functional_meta.loggers import Logger
from functional_meta.recipes import build


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``--threads`` is given."""
    if threads is not None:
        torch.set_num_threads(threads)


def watch(out: Path, *, tensorboard: bool) -> list[Logger]:
    """The run's loggers: ``metrics.jsonl`` as it happens, and TensorBoard scalars in
    ``OUTPUT_DIR/tensorboard`` with ``--tensorboard`` (ImportError without the package)."""
    from functional_meta.loggers import MetricsFile, TensorBoard

    loggers: list[Logger] = [MetricsFile(out / "metrics.jsonl")]
    if tensorboard:
        loggers.append(TensorBoard(out / "tensorboard"))
    return loggers


# What a run writes to its directory (a cache directory there is kept by --overwrite).
RUN_FILES = ("checkpoints", "results.json", "config.json", "baseline.json", "metrics.jsonl",
             "metrics.csv", "epochs.csv", "learning_curves.png", "sinusoid.png",
             "tensorboard")  # fmt: skip
BASELINE = "baseline.json"
LOCK = ".functional-meta.lock"


def previous_run(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (empty when there is none)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], Any, list[str]]:
    """``(config, checkpoint, changes)`` of the run ``args`` ask for, every argument checked
    (before a process group is joined, so that a bad argument is one line on every rank):
    a new run's configuration, refused when its directory holds a previous run without
    ``--overwrite``; or, with ``--resume``, the checkpoint's, compared with the options given
    (:func:`~functional_meta.cli.arguments.resume_config`)."""
    from functional_meta.checkpoint import load_checkpoint

    if args.output_dir is not None:
        check_output_dir(args.output_dir)
    if not (0 <= args.log_every_seconds < float("inf")):
        raise UsageError(f"--log-every-seconds must be >= 0, got {args.log_every_seconds}")
    if not args.resume:
        config = train_config(args)
        out = Path(config["output_dir"])
        found = previous_run(out)
        if found and not args.overwrite:
            raise UsageError(
                f"{out} holds a previous run ({', '.join(found)}); pass --resume to continue "
                "it, --overwrite to replace it, or choose another --output-dir"
            )
        return config, None, []
    if args.overwrite:
        raise UsageError(
            "--resume continues the run in OUTPUT_DIR, --overwrite replaces it: give one"
        )
    out = Path(args.output_dir or default_output_dir(args))
    last = out / "checkpoints" / "last.pt"
    if not last.is_file():
        previous = f" (it holds {', '.join(previous_run(out))})" if previous_run(out) else ""
        raise FileNotFoundError(
            f"--resume: {last} does not exist, nothing to continue in {out}{previous}; start "
            "the run again with --overwrite, or without --resume in another --output-dir"
        )
    checkpoint = load_checkpoint(last)
    if "algorithm" not in checkpoint.config:
        raise ValueError(f"{checkpoint.path}: not a checkpoint written by {PROG} train")
    saved = dict(checkpoint.config) | {"output_dir": str(out)}
    config, changes = resume_config(saved, args)
    done = {"steps": checkpoint.step, "epochs": checkpoint.epoch}
    key = "steps" if config["steps"] is not None else "epochs"
    if config[key] < done[key]:
        raise UsageError(
            f"--{key} {config[key]}: the run in {out} has already done {done[key]} {key}; "
            "give a larger budget to continue it (evaluate scores it as it is)"
        )
    return config, checkpoint, changes


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: meta-train, evaluate before and after, write checkpoints/metrics/plots.
    Under torchrun: check the arguments, join the process group, check that every rank
    has the same configuration, silence stdout on ranks other than 0."""
    from functional_meta import distributed

    config, resume, changes = prepare(args)
    out = Path(config["output_dir"])
    if (distributed.torchrun_env() or {}).get("rank", 0) != 0:
        return _joined(args, config, resume, changes)
    try:  # rank 0 holds the directory for the whole run: a second run there is refused
        with process_lock(out / LOCK):
            return _joined(args, config, resume, changes)
    except LockedError as error:
        raise UsageError(
            f"{out} is in use by another run ({error.holder or 'starting'}: host and process); "
            f"wait for it to end or choose another --output-dir (if that run is gone, remove "
            f"{error.path})"
        ) from None


def _joined(
    args: argparse.Namespace, config: dict[str, Any], resume: Any, changes: list[str]
) -> int:
    """:func:`_train` inside the process group (none in a plain process)."""
    from functional_meta import distributed

    ctx = distributed.init("nccl" if config["device"].startswith("cuda") else "gloo")
    try:
        with contextlib.ExitStack() as stack:
            if not ctx.is_main:
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            return _train(args, ctx, config, resume, changes)
    finally:
        distributed.shutdown()


def _baseline(out: Path) -> dict[str, Any] | None:
    """The scores before meta-training that the run saved when it started, if any."""
    path = out / BASELINE
    return json.loads(path.read_text()) if path.is_file() else None


def _train(
    args: argparse.Namespace, ctx: Any, config: dict[str, Any], resume: Any, changes: list[str]
) -> int:
    from functional_meta import distributed
    from functional_meta.steps import init_state
    from functional_meta.training import fit, write_metrics

    out = Path(config["output_dir"])
    if ctx.device.type == "cuda":
        config["device"] = str(ctx.device)  # nccl: this rank's GPU, cuda:LOCAL_RANK
    if config["meta_batch_size"] % ctx.world_size:
        raise UsageError(
            f"--meta-batch-size {config['meta_batch_size']} does not split evenly over "
            f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
        )
    # Paths, devices and threads may differ between machines; every other setting may not.
    distributed.check_same_config(config, ignore=("device", "threads", "data_dir", "cache_dir"))
    if resume is not None:
        print(f"{PROG}: resuming {out} at step {resume.step} with its saved settings"
              + (f"; changed: {', '.join(changes)}" if changes else ""))  # fmt: skip
    elif previous_run(out) and ctx.is_main:  # --overwrite: no file of the old run survives
        print(f"{PROG}: --overwrite: removing the previous run in {out}")
        for name in previous_run(out):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    loggers = watch(out, tensorboard=args.tensorboard) if ctx.is_main else []
    set_threads(config["threads"])
    experiment = build(config)
    if ctx.is_main:  # before training, so that a stopped run keeps its settings
        write_json(out / "config.json", config)
    test_tasks = experiment.test_tasks(config["test_tasks"])
    algorithm = experiment.algorithm
    budget = f"{config['steps']} steps" if config["steps"] else f"{config['epochs']} epochs"
    protocol = f" ({config['protocol']} protocol)" if config.get("protocol") else ""
    print(f"{PROG}: {config['algorithm']} on {config['dataset']}{protocol}, {budget} "
          f"(meta-batch {config['meta_batch_size']}, strategy {config['strategy']}), output {out}")  # fmt: skip
    params = {k: v.to(config["device"]) for k, v in experiment.params.items()}
    buffers = {k: v.to(config["device"]) for k, v in experiment.buffers.items()}
    state = init_state(algorithm, params, buffers, experiment.optimizer)
    state = distributed.broadcast(state)  # identical start on every rank (no-op alone)
    sample = experiment.sample
    if ctx.world_size > 1:  # every rank draws the same meta-batch and keeps its slice

        def sample(generator: torch.Generator) -> Any:
            return distributed.shard(experiment.sample(generator))

    before = _baseline(out) if resume is not None else None
    if resume is None and not args.no_baseline:
        scores = test_scores(config, experiment, state, test_tasks)
        print_table(config, {"before meta-training": scores})
        before = {str(k): r.as_dict() for k, r in scores.items()}
        if ctx.is_main:  # kept for the results of a resumed run
            write_json(out / BASELINE, before)
    every = config["val_every"] or config["steps_per_epoch"]
    if config["val_tasks"] and config["steps"] and config["steps"] < every:
        what = "--val-every" if config["val_every"] else "one epoch, see --steps-per-epoch"
        print(f"note: {config['steps']} steps are fewer than the {every} between validations "
              f"({what}): the run will not validate, keep a best.pt or stop early")  # fmt: skip
    result = fit(
        algorithm, state, sample, optimizer=experiment.optimizer, epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"], max_steps=config["steps"],
        generator=torch.Generator().manual_seed(config["seed"]), val_tasks=experiment.val_tasks,
        val_every=config["val_every"], val_steps=config["eval_inner_steps"],
        patience=config["patience"], min_delta=config["min_delta"], clip_norm=config["clip"],
        device=config["device"], progress=False if args.no_progress else None,
        log_every_seconds=args.log_every_seconds or None, loggers=loggers,
        checkpoint_dir=out / "checkpoints", config=config, resume=resume,
        gradient=distributed.data_parallel(algorithm.grad) if ctx.world_size > 1 else None,
        is_main_process=ctx.is_main,
    )  # fmt: skip
    seconds = result.progress.seconds  # the whole run's, resumed parts included
    history = result.history
    print(f"meta-trained {result.progress.step} steps in {seconds:.1f} s ({history.stop_reason})")
    if ctx.is_main:  # only rank 0 writes; the trained state is saved before it is scored
        from functional_meta.checkpoint import save_checkpoint

        save_checkpoint(out / "checkpoints" / "final.pt", result.state, step=result.progress.step,
                        epoch=result.progress.epoch, config=config)  # fmt: skip
        write_metrics(history, out)
    after = test_scores(config, experiment, result.state, test_tasks)
    rows = {"before meta-training": scores_of(before)} if before else {}
    print_table(config, rows | {"after meta-training": after})
    if not ctx.is_main:
        return 0
    write_json(out / "results.json", {
        "train_seconds": seconds, "steps": result.progress.step, "stop_reason": history.stop_reason,
        "machine": describe_machine(config["device"]), "code": code_version(),
        "before": before,
        "after": {k: r.as_dict() for k, r in after.items()},
    })  # fmt: skip
    if not args.no_plots:
        write_plots(config, experiment, result.state, history, out)
    return 0
