"""``functional-meta train``: meta-train, score before and after, write the run directory."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from functional_meta.cli.arguments import (
    PROG,
    UsageError,
    apply_budget,
    check_config,
    default_output_dir,
    train_config,
)
from functional_meta.cli.report import print_table, test_scores, write_json, write_plots
from functional_meta.environment import code_version, describe_machine
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
        out = Path(args.output_dir or default_output_dir(args))
        resume = load_checkpoint(out / "checkpoints" / "last.pt")
        config = dict(resume.config)
        if "algorithm" not in config:
            raise ValueError(f"{resume.path}: not a checkpoint written by {PROG} train")
        config["output_dir"] = str(out)
        for key in ("device", "threads"):
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        apply_budget(config, args)
        check_config(config)
    else:
        config = train_config(args)
    out = Path(config["output_dir"])
    if ctx.device.type == "cuda":
        config["device"] = str(ctx.device)  # nccl: this rank's GPU, cuda:LOCAL_RANK
    if config["meta_batch_size"] % ctx.world_size:
        raise UsageError(
            f"--meta-batch-size {config['meta_batch_size']} does not split evenly over "
            f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
        )
    if not (0 <= args.log_every_seconds < float("inf")):
        raise UsageError(f"--log-every-seconds must be >= 0, got {args.log_every_seconds}")
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

    before = None
    if resume is None and not args.no_baseline:
        before = test_scores(config, experiment, state, test_tasks)
        print_table(config, {"before meta-training": before})
    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    history = result.history
    print(f"meta-trained {result.progress.step} steps in {seconds:.1f} s ({history.stop_reason})")
    if ctx.is_main:  # only rank 0 writes; the trained state is saved before it is scored
        from functional_meta.checkpoint import save_checkpoint

        save_checkpoint(out / "checkpoints" / "final.pt", result.state, step=result.progress.step,
                        epoch=result.progress.epoch, config=config)  # fmt: skip
        write_metrics(history, out)
    after = test_scores(config, experiment, result.state, test_tasks)
    rows = {"before meta-training": before} if before else {}
    print_table(config, rows | {"after meta-training": after})
    if not ctx.is_main:
        return 0
    write_json(out / "results.json", {
        "train_seconds": seconds, "steps": result.progress.step, "stop_reason": history.stop_reason,
        "machine": describe_machine(config["device"]), "code": code_version(),
        "before": {k: r.as_dict() for k, r in before.items()} if before else None,
        "after": {k: r.as_dict() for k, r in after.items()},
    })  # fmt: skip
    if not args.no_plots:
        write_plots(config, experiment, result.state, history, out)
    return 0
