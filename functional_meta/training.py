"""``fit``: a training loop over a task source for any algorithm's step.

The loop holds loop state (step and epoch counters, the best parameters so far, the
history); the algorithm stays pure. ``fit`` works for any :class:`~functional_meta.Algorithm`
record: each step is the meta-gradient (the record's ``grad``, or a given ``gradient`` such
as its cross-process mean from ``functional_meta.distributed.data_parallel``), optional
global-norm clipping (``optim.clip_by_global_norm``) and :func:`functional_meta.update`.

Task sources
    - a callable ``sample(generator) -> TaskBatch`` (e.g.
      ``lambda g: sinusoid_tasks(25, generator=g)``), called ``steps_per_epoch`` times per
      epoch with ``generator`` (checkpointed, so resuming draws the same tasks);
    - an iterable (a list, a ``DataLoader``) re-iterated every epoch, whose items are a
      :class:`TaskBatch`, a list of tasks in the original format
      ``[((support_x, support_y), (query_x, query_y)), ...]``, or one pair of pairs of
      tensors with a leading task axis (what a ``DataLoader`` collates such tuples into).

Non-finite losses
    The core raises :class:`NonFiniteError` before anything is updated; ``fit`` re-raises
    it with the step and epoch (and the last checkpoint written, if any) in the message.
    The state returned by the last successful call, or the last checkpoint, is intact.

Processes
    ``is_main_process=False`` (non-zero ranks) turns off the progress bar, the loggers and
    checkpoint writing; everything else (validation, early stopping, callbacks) runs on
    every process so that all ranks stop at the same step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from functional_meta.data.tasks import TaskBatch, as_task_batch
from functional_meta.evaluation import evaluate, state_to
from functional_meta.history import (
    FitProgress,
    History,
    check_new_run_directory,
    check_resumable,
    write_metrics,
)
from functional_meta.loggers import Logger, progress_display
from functional_meta.optim import GradientTransformation, clip_by_global_norm
from functional_meta.steps import Algorithm, Gradient, TrainState, update
from functional_meta.validation import NonFiniteError, check_count, check_positive_number

__all__ = [
    "FitProgress",
    "FitResult",
    "GradientFn",
    "History",
    "as_task_batch",
    "fit",
    "write_metrics",
]  # FitProgress, History and write_metrics live in functional_meta.history

TaskSource = Callable[[torch.Generator], Any] | Iterable[Any]
GradientFn = Callable[..., Gradient]
Callback = Callable[[str, dict[str, Any], TrainState], bool | None]


@dataclass
class FitResult:
    """``state``: the final (with early stopping and ``restore_best``: the best) state;
    ``history``; ``best_state`` (``None`` without validation); ``progress`` (to resume)."""

    state: TrainState
    history: History
    best_state: TrainState | None
    progress: FitProgress


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def fit(
    algorithm: Algorithm,
    state: TrainState,
    tasks: TaskSource,
    *,
    optimizer: GradientTransformation,
    epochs: int = 1,
    steps_per_epoch: int | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | int = 0,
    val_tasks: TaskBatch | Iterable[TaskBatch] | None = None,
    val_every: int | None = None,
    val_steps: int | None = None,
    monitor: str = "auto",
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    clip_norm: float | None = None,
    gradient: GradientFn | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    log_every_seconds: float | None = None,
    loggers: Sequence[Logger] = (),
    callback: Callback | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    config: dict[str, Any] | None = None,
    resume: Any = None,
    is_main_process: bool = True,
) -> FitResult:
    """Meta-train ``state`` with ``algorithm`` on ``tasks`` until ``epochs`` epochs are done.

    Args:
        algorithm, state, optimizer: as for :func:`functional_meta.step` (``state`` from
            :func:`functional_meta.init_state`).
        tasks: a task source (see the module docstring); batches ``support_x [T, S, ...]``.
        epochs: the epoch count to reach (a resumed run continues towards the same total).
        steps_per_epoch: updates per epoch; required for a callable source, optional for an
            iterable (default: one pass over it).
        max_steps: stop after this many updates in total (resumable mid-epoch).
        generator: a ``torch.Generator`` or int seed for the callable source and Reptile's
            inner mini-batches (advanced in place; its state is checkpointed).
        val_tasks: fixed validation tasks (a TaskBatch or an iterable of them), scored with
            :func:`functional_meta.evaluate` (adaptation, no outer graph) every
            ``val_every`` updates, or at the end of every epoch when ``val_every`` is None;
            ``val_steps`` inner steps (default: as trained).
        monitor: ``"val_loss"`` (lower is better), ``"val_accuracy"`` (higher is better) or
            ``"auto"`` (accuracy for classification, else loss).
        patience, min_delta: stop after ``patience`` validations in a row that did not
            improve on the best by more than ``min_delta``. ``restore_best``: return the
            best state (parameters, optimizer state and buffers at the best validation).
        clip_norm: clip the meta-gradient's global norm before the update.
        gradient: ``gradient(meta_params, buffers, tasks, *, epoch, generator) ->``
            :class:`~functional_meta.Gradient`, each step's meta-gradient (default
            ``algorithm.grad``). Data-parallel training passes
            ``distributed.data_parallel(algorithm.grad)``: the mean over processes, with
            every rank raising in the same step when one fails.
        device: move the state and every batch there.
        progress: a tqdm bar with loss and accuracy (``None``: only when stderr is a
            terminal and tqdm is installed).
        log_every_seconds: without a bar, print a status line (step, loss, accuracy,
            validation, steps/s, ETA) to stderr every this many seconds
            (:class:`~functional_meta.loggers.StatusLine`); ``None``: print nothing.
        loggers: :class:`~functional_meta.loggers.Logger` instances that receive every
            step, validation and epoch record as it happens (e.g.
            ``MetricsFile("run/metrics.jsonl")``, ``TensorBoard("run/tensorboard")``).
        callback: ``callback(event, record, state)`` with ``event`` in ``"step"``,
            ``"validation"``, ``"epoch"``; returning ``True`` stops training.
        checkpoint_dir: write ``last.pt`` there every ``checkpoint_every`` updates (default:
            every epoch) and at the end, and ``best.pt`` at every improvement; ``config`` is
            stored in them. A new run (no ``resume``) refuses a directory holding these.
        resume: a :class:`functional_meta.checkpoint.Checkpoint` or a path to one written
            by ``fit``: continue from its state, counters, generator and history. It must
            come from the same algorithm and have the names and shapes of ``state``
            (:func:`functional_meta.history.check_resumable`); its values replace ``state``'s.
        is_main_process: ``False`` on non-zero ranks: no bar, no loggers, no checkpoints.

    Returns a :class:`FitResult`. Raises :class:`NonFiniteError` (with the step) when a
    meta-loss or gradient is not finite.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm: expected an Algorithm record, got {type(algorithm).__name__}")
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState from init_state, got {type(state).__name__}")
    check_count("epochs", epochs)
    for name, value in (("steps_per_epoch", steps_per_epoch), ("max_steps", max_steps),
                        ("val_every", val_every), ("patience", patience),
                        ("checkpoint_every", checkpoint_every)):  # fmt: skip
        check_count(name, value, optional=True)
    check_count("val_steps", val_steps, minimum=0, optional=True)
    if monitor not in ("auto", "val_loss", "val_accuracy"):
        raise ValueError(f"monitor: expected 'auto', 'val_loss' or 'val_accuracy', got {monitor!r}")
    if not (isinstance(min_delta, int | float) and min_delta >= 0 and math.isfinite(min_delta)):
        raise ValueError(f"min_delta: expected a finite number >= 0, got {min_delta!r}")
    if patience is not None and val_tasks is None:
        raise ValueError("patience: early stopping needs val_tasks to validate on")
    sampler = tasks if callable(tasks) and not isinstance(tasks, Iterable) else None
    if sampler is None and not isinstance(tasks, Iterable):
        raise TypeError(
            "tasks: expected a callable sample(generator) -> TaskBatch or an iterable of "
            f"batches, got {type(tasks).__name__}"
        )
    if sampler is not None and steps_per_epoch is None:
        raise ValueError("steps_per_epoch: required when tasks is a callable sampler")
    if gradient is not None and not callable(gradient):
        raise TypeError(f"gradient: expected a callable, got {type(gradient).__name__}")
    gradient = gradient or algorithm.grad
    if not isinstance(loggers, Sequence) or not all(isinstance(x, Logger) for x in loggers):
        raise TypeError(
            f"loggers: expected a sequence of loggers.Logger instances, got {loggers!r}"
        )
    if log_every_seconds is not None:
        check_positive_number("log_every_seconds", log_every_seconds)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator or an int seed, got {type(generator).__name__}"
        )
    clip = None if clip_norm is None else clip_by_global_norm(clip_norm)

    from functional_meta.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    best_state: TrainState | None = None
    if resume is not None:
        checkpoint = resume if isinstance(resume, Checkpoint) else load_checkpoint(resume)
        if "fit" not in checkpoint.extra:
            raise ValueError(f"resume: checkpoint {checkpoint.path} was not written by fit")
        check_resumable(checkpoint, algorithm, state)
        state = checkpoint.state
        run = FitProgress.from_dict(checkpoint.extra["fit"])
        if run.steps_per_epoch not in (None, steps_per_epoch):
            raise ValueError(
                f"steps_per_epoch: the run in {checkpoint.path} has epochs of "
                f"{run.steps_per_epoch} steps, got {steps_per_epoch}; resume with the same "
                "epoch length (validation and schedules count epochs)"
            )
        best_state = checkpoint.extra.get("best_state")
        if "tasks" in checkpoint.generators:
            checkpoint.restore_generator(generator, "tasks")
    else:
        run = FitProgress(steps_per_epoch=steps_per_epoch)
    state = state_to(state, device)
    best_state = state_to(best_state, device) if best_state is not None else None
    history = run.history
    history.stop_reason = None
    main = bool(is_main_process)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None and main else None
    if directory is not None and resume is None:
        check_new_run_directory(directory)
    last_checkpoint: Path | None = None

    def save(name: str) -> None:
        nonlocal last_checkpoint
        run.seconds = elapsed + time.perf_counter() - started
        if directory is None:
            return
        path = save_checkpoint(
            directory / name, state, step=run.step, epoch=run.epoch,
            generators={"tasks": generator}, config=config,
            extra={"fit": run.to_dict(), "best_state": best_state, "algorithm": algorithm.name},
        )  # fmt: skip
        if name == "last.pt":
            last_checkpoint = path

    def context(error: Exception, where: str | None = None) -> str:
        where = where or f"step {run.step + 1} (epoch {run.epoch + 1})"
        saved = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else ""
        return f"{where}: {error}{saved}"

    def emit(event: str, record: dict[str, Any]) -> bool:
        return bool(callback(event, record, state)) if callback is not None else False

    def validate() -> None:
        """Score the validation tasks and update early stopping (may set stop_reason)."""
        nonlocal best_state
        try:
            result = evaluate(algorithm, state, val_tasks, steps=val_steps, device=device)
        except NonFiniteError as error:
            raise NonFiniteError(context(error, f"validation after step {run.step}")) from error
        record = {"step": run.step, "epoch": run.epoch, "val_loss": result.loss,
                  "val_loss_ci": result.loss_ci, "val_steps": result.steps}  # fmt: skip
        if result.accuracy is not None:
            record |= {"val_accuracy": result.accuracy, "val_accuracy_ci": result.accuracy_ci}
        if run.monitor is None:
            run.monitor = monitor if monitor != "auto" else (
                "val_accuracy" if result.accuracy is not None else "val_loss")  # fmt: skip
        if run.monitor not in record:
            raise ValueError(
                f"monitor: {run.monitor!r} is not available for these tasks (regression?)"
            )
        value = record[run.monitor]
        sign = 1.0 if run.monitor == "val_loss" else -1.0
        improved = run.best_value is None or sign * (run.best_value - value) > min_delta
        if improved:
            run.best_value, run.best_step, run.bad_validations = value, run.step, 0
            best_state = state
            history.best = dict(record)
        else:
            run.bad_validations += 1
        record["best"] = improved
        history.validations.append(record)
        for logger in active:
            logger.on_validation(record)
        stop = emit("validation", record)
        if improved:
            save("best.pt")
        if patience is not None and run.bad_validations >= patience:
            history.stop_reason = "early_stopping"
        elif stop:
            history.stop_reason = "callback"

    def epoch_batches() -> Iterator[Any]:
        if sampler is not None:
            while True:
                yield sampler(generator)
        iterator = iter(tasks)
        if iterator is tasks and run.epoch > 0:
            raise TypeError("tasks: a one-shot iterator cannot be re-iterated for another epoch; pass a list or a DataLoader")  # fmt: skip
        for _ in range(run.epoch_step):  # resuming mid-epoch: skip what was used
            next(iterator, None)
        yield from iterator

    total = max_steps
    if total is None and steps_per_epoch is not None:
        total = epochs * steps_per_epoch
    elif total is None and hasattr(tasks, "__len__"):
        total = epochs * len(tasks)  # type: ignore[arg-type]
    display = progress_display(progress, log_every_seconds) if main else None
    active = [*loggers, *([display] if display else [])] if main else []
    started, elapsed = time.perf_counter(), run.seconds
    try:
        for logger in active:
            logger.on_start(history, run.step, total)
        while run.epoch < epochs and history.stop_reason is None:
            batches = epoch_batches()
            complete = False
            while True:
                if steps_per_epoch is not None and run.epoch_step >= steps_per_epoch:
                    complete = True
                    break
                if history.stop_reason is not None:
                    break
                if max_steps is not None and run.step >= max_steps:
                    history.stop_reason = "max_steps"
                    break
                item = next(batches, None)
                if item is None:
                    if run.epoch_step == 0:
                        raise ValueError("tasks: the task source yielded no batches this epoch")
                    complete = True
                    break
                batch = as_task_batch(item)
                if device is not None:
                    batch = batch.to(device)
                try:
                    result = gradient(state.meta_params, state.buffers, batch,
                                      epoch=float(run.epoch), generator=generator)  # fmt: skip
                    if clip is not None:
                        clipped, _ = clip.update(result.grads, {}, state.meta_params)
                        result = result._replace(grads=clipped)
                    state = update(algorithm, state, result, optimizer)
                except NonFiniteError as error:
                    raise NonFiniteError(context(error)) from error
                metrics = result.metrics
                run.step += 1
                run.epoch_step += 1
                record = {"step": run.step, "epoch": run.epoch, **metrics,
                          "time": time.perf_counter() - started}  # fmt: skip
                history.steps.append(record)
                for key, value in _scalar_metrics(metrics).items():
                    run.epoch_sums[key] = run.epoch_sums.get(key, 0.0) + value
                run.epoch_count += 1
                for logger in active:
                    logger.on_step(record)
                if emit("step", record):
                    history.stop_reason = "callback"
                if val_tasks is not None and val_every is not None and run.step % val_every == 0:
                    validate()
                if checkpoint_every is not None and run.step % checkpoint_every == 0:
                    save("last.pt")
            if not complete:
                break
            run.epoch += 1
            means = {k: v / max(run.epoch_count, 1) for k, v in run.epoch_sums.items()}
            run.epoch_step, run.epoch_sums, run.epoch_count = 0, {}, 0
            if val_tasks is not None and val_every is None and history.stop_reason is None:
                validate()
            record = {"epoch": run.epoch, "step": run.step, **means}
            if history.validations and history.validations[-1]["step"] == run.step:
                last = history.validations[-1]
                record |= {k: v for k, v in last.items() if k.startswith("val_")}
            history.epochs.append(record)
            for logger in active:
                logger.on_epoch(record)
            if emit("epoch", record) and history.stop_reason is None:
                history.stop_reason = "callback"
            if checkpoint_every is None:
                save("last.pt")
        if history.stop_reason is None:
            history.stop_reason = "epochs"
        save("last.pt")
    finally:
        for logger in active:
            logger.close()
    run.seconds = elapsed + time.perf_counter() - started
    final = state
    if restore_best and best_state is not None and history.stop_reason == "early_stopping":
        final = best_state
    return FitResult(final, history, best_state, run)
