"""Loggers: where ``fit`` reports a run while it happens, one mechanism for every destination.

``fit(..., loggers=[...])`` hands every record to each :class:`Logger` the moment it exists:
``on_start`` once (with the history so far: empty, or a resumed run's), then ``on_step``,
``on_validation`` and ``on_epoch`` in the order they happen, and ``close`` at the end (also
when training raises). The records are those of :class:`~functional_meta.history.History`.

- :class:`MetricsFile`: ``metrics.jsonl``, one JSON line per record, appended and flushed,
  so a run stopped at any step leaves its metrics up to that step;
- :class:`ProgressBar`: the tqdm bar, on a terminal;
- :class:`StatusLine`: one line every N seconds (step, loss, accuracy, validation, steps/s,
  ETA), for the logs of a job without a terminal;
- :class:`TensorBoard`: scalars for TensorBoard (the optional ``tensorboard`` package).

``fit`` builds the display itself (``progress``, ``log_every_seconds``); the others are
passed in ``loggers``. A new destination is a subclass overriding the methods it needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from functional_meta.history import History, metric_records
from functional_meta.validation import check_positive_number

__all__ = [
    "Logger",
    "MetricsFile",
    "ProgressBar",
    "StatusLine",
    "TensorBoard",
    "progress_display",
    "summary",
]


class Logger:
    """Receives ``fit``'s records as they happen; every method does nothing unless overridden."""

    def on_start(self, history: History, step: int, total: int | None) -> None:
        """Before the first update: ``history`` so far (a resumed run's), ``step`` updates
        already done, ``total`` updates planned (``None``: unknown)."""

    def on_step(self, record: dict[str, Any]) -> None:
        """After each meta-update: ``step``, ``epoch``, the step's metrics, ``time``."""

    def on_validation(self, record: dict[str, Any]) -> None:
        """After each validation: ``step``, ``val_loss``, ``val_accuracy`` ..., ``best``."""

    def on_epoch(self, record: dict[str, Any]) -> None:
        """After each epoch: ``epoch`` (count), ``step``, the epoch's mean metrics."""

    def close(self) -> None:
        """At the end of ``fit``, also when it raises."""


class MetricsFile(Logger):
    """``metrics.jsonl`` at ``path``: one JSON object per line, ``{"kind": "step" |
    "validation" | "epoch", **record}``, in the order they happen, each line flushed.

    ``on_start`` rewrites the file (atomically) with the records of the history it is given,
    so a resumed run continues from its checkpoint's records: lines logged after that
    checkpoint, by the run that stopped, are dropped rather than repeated.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"MetricsFile: path must be a path, got {type(path).__name__}")
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def on_start(self, history: History, step: int, total: int | None) -> None:
        from functional_meta.checkpoint import atomic_write

        text = "".join(json.dumps(record) + "\n" for record in metric_records(history))
        atomic_write(self.path, lambda handle: handle.write(text.encode()))
        self._handle = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        if self._handle is None:
            raise RuntimeError("MetricsFile: on_start was not called (pass it to fit)")
        self._handle.write(json.dumps({"kind": kind, **record}) + "\n")
        self._handle.flush()

    def on_step(self, record: dict[str, Any]) -> None:
        self._write("step", record)

    def on_validation(self, record: dict[str, Any]) -> None:
        self._write("validation", record)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self._write("epoch", record)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def summary(step: dict[str, Any] | None, validation: dict[str, Any] | None) -> str:
    """``loss=… acc=… val_loss=… val_acc=…``: the last step's and the last validation's."""
    parts = []
    if step is not None:
        parts.append(f"loss={step['loss']:.4g}")
        if "accuracy" in step:
            parts.append(f"acc={step['accuracy']:.3f}")
    if validation is not None:
        parts.append(f"val_loss={validation['val_loss']:.4g}")
        if "val_accuracy" in validation:
            parts.append(f"val_acc={validation['val_accuracy']:.3f}")
    return " ".join(parts)


class _Summarized(Logger):
    """Keeps the last step and validation records, for :func:`summary`."""

    def __init__(self) -> None:
        self.last_step: dict[str, Any] | None = None
        self.last_validation: dict[str, Any] | None = None

    def on_start(self, history: History, step: int, total: int | None) -> None:
        self.last_step = history.steps[-1] if history.steps else None
        self.last_validation = history.validations[-1] if history.validations else None

    def on_step(self, record: dict[str, Any]) -> None:
        self.last_step = record

    def on_validation(self, record: dict[str, Any]) -> None:
        self.last_validation = record


class ProgressBar(_Summarized):
    """A tqdm bar (``tqdm``: the bar class, e.g. ``tqdm.auto.tqdm``) with :func:`summary`."""

    def __init__(self, tqdm: Callable[..., Any]) -> None:
        super().__init__()
        self._tqdm = tqdm
        self._bar: Any = None

    def on_start(self, history: History, step: int, total: int | None) -> None:
        super().on_start(history, step, total)
        self._bar = self._tqdm(
            total=total, initial=step, desc="meta-train", unit="step", dynamic_ncols=True
        )

    def on_step(self, record: dict[str, Any]) -> None:
        super().on_step(record)
        self._bar.update(1)
        self._bar.set_postfix_str(summary(self.last_step, self.last_validation), refresh=False)

    def on_validation(self, record: dict[str, Any]) -> None:
        super().on_validation(record)
        self._bar.set_postfix_str(summary(self.last_step, self.last_validation), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class StatusLine(_Summarized):
    """One line to ``stream`` (default: ``sys.stderr`` at the time of writing) after the first
    update that comes ``every_seconds`` or more after the previous line (or the start):

    ``step 120/5000 (epoch 1) loss=0.51 val_loss=0.43 | 3.90 steps/s, ETA 0:20:51``

    Steps per second count this call's updates over this call's time (a resumed run's are
    its own), the ETA the remaining updates at that rate. ``clock`` (seconds, monotonic)
    is ``time.monotonic``; tests pass a fake one.
    """

    def __init__(
        self,
        every_seconds: float = 30.0,
        *,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.every_seconds = check_positive_number("every_seconds", every_seconds)
        self._stream, self._clock = stream, clock
        self._total: int | None = None
        self._start_step, self._start_time, self._last_line = 0, 0.0, 0.0

    def on_start(self, history: History, step: int, total: int | None) -> None:
        super().on_start(history, step, total)
        self._total, self._start_step = total, step
        self._start_time = self._last_line = self._clock()

    def on_step(self, record: dict[str, Any]) -> None:
        super().on_step(record)
        now = self._clock()
        if now - self._last_line < self.every_seconds:
            return
        self._last_line = now
        step = record["step"]
        rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
        where = f"step {step}" + (f"/{self._total}" if self._total is not None else "")
        speed = f"{rate:.3g} steps/s"
        if self._total is not None and rate > 0:
            speed += f", ETA {_duration(max(self._total - step, 0) / rate)}"
        text = summary(self.last_step, self.last_validation)
        print(f"{where} (epoch {record['epoch'] + 1}) {text} | {speed}",
              file=self._stream or sys.stderr, flush=True)  # fmt: skip


class TensorBoard(Logger):
    """Scalars for TensorBoard in ``log_dir``, written with
    ``torch.utils.tensorboard.SummaryWriter``: ``train/<metric>`` per step, ``val/<metric>``
    per validation (``val/loss``, ``val/accuracy``), ``epoch/<metric>`` per epoch, each at its
    ``step``. A resumed run purges the events after its checkpoint's step.

    Needs the ``tensorboard`` package (``pip install 'functional-meta[tensorboard]'``);
    without it the constructor raises ``ImportError`` saying so.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not isinstance(log_dir, str | os.PathLike):
            raise TypeError(f"TensorBoard: log_dir must be a path, got {type(log_dir).__name__}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'functional-meta[tensorboard]' (or pip install tensorboard)"
            ) from error
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def on_start(self, history: History, step: int, total: int | None) -> None:
        purge = step + 1 if step > 0 else None  # events a stopped run logged after `step`
        self._writer = self._writer_class(str(self.log_dir), purge_step=purge)

    def _scalars(self, prefix: str, record: dict[str, Any], keys: Callable[[str], str | None]):
        for key, value in record.items():
            name = keys(key)
            if name is not None and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{name}", value, record["step"])

    def on_step(self, record: dict[str, Any]) -> None:
        self._scalars("train", record, lambda k: None if k in ("step", "epoch", "time") else k)

    def on_validation(self, record: dict[str, Any]) -> None:
        def name(key: str) -> str | None:
            keep = key.startswith("val_") and not key.endswith("_ci") and key != "val_steps"
            return key[4:] if keep else None

        self._scalars("val", record, name)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self._scalars(
            "epoch", record, lambda k: None if k in ("step", "epoch") or k.startswith("val_") else k
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress_display(enabled: bool | None, log_every_seconds: float | None) -> Logger | None:
    """What ``fit`` shows: a :class:`ProgressBar` when ``enabled`` (``None``: when stderr is a
    terminal) and tqdm is installed; otherwise a :class:`StatusLine` every
    ``log_every_seconds`` when that is given; otherwise nothing."""
    on_terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if enabled or (enabled is None and on_terminal):
        try:
            from tqdm.auto import tqdm

            return ProgressBar(tqdm)
        except ImportError:
            if enabled:
                warnings.warn(
                    "progress=True needs tqdm (pip install 'functional-meta[progress]'); no bar",
                    stacklevel=3,
                )
    return StatusLine(log_every_seconds) if log_every_seconds is not None else None
