"""What a ``fit`` run records: its :class:`History`, the loop state a checkpoint keeps
(:class:`FitProgress`) and what resuming from one checks, and the metric files (written as
the run goes by :class:`functional_meta.loggers.MetricsFile`, all at once by
:func:`write_metrics`)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from functional_meta import tree
from functional_meta.validation import all_finite

__all__ = [
    "FitProgress",
    "History",
    "check_new_run_directory",
    "check_resumable",
    "metric_records",
    "write_metrics",
]


@dataclass
class History:
    """What happened, as plain numbers.

    ``steps``: one dict per meta-update (``step`` 1-based, ``epoch`` 0-based, ``loss``,
    ``accuracy`` for classification, ``query_loss``, ``support_losses`` ..., ``time`` in
    seconds since the call started); ``validations``: one per validation (``step``,
    ``epoch``, ``val_steps`` (inner steps), ``val_loss``, ``val_loss_ci``, ``val_accuracy``, ``val_accuracy_ci``);
    ``epochs``: one per completed epoch (``epoch`` 1-based count, ``step``, the epoch's mean
    ``loss``/``accuracy`` and its last validation); ``best``: the best validation record;
    ``stop_reason``: ``"epochs"``, ``"max_steps"``, ``"early_stopping"`` or ``"callback"``.
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stop_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict`."""
        return cls(
            **{k: data.get(k) for k in ("steps", "validations", "epochs", "best", "stop_reason")}
        )


@dataclass
class FitProgress:
    """The loop's own state, saved in checkpoints so that a resumed run continues exactly.

    ``step``: meta-updates done; ``epoch``: epochs completed; ``epoch_step``: updates done
    in the current epoch; ``epoch_sums``/``epoch_count``: running sums of the current
    epoch's scalar metrics; early stopping's ``best_value``, ``best_step`` and
    ``bad_validations``; ``seconds``: the training time so far, over every call that
    continued the run (so a resumed run's total counts the whole run); ``steps_per_epoch``:
    the epoch length it was started with (a resume must keep it); the :class:`History`.
    """

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_count: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    monitor: str | None = None
    seconds: float = 0.0
    steps_per_epoch: int | None = None
    history: History = field(default_factory=History)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitProgress:
        """The inverse of :meth:`to_dict`."""
        data = dict(data)
        data["history"] = History.from_dict(data.get("history") or {})
        return cls(**data)


def check_resumable(checkpoint: Any, algorithm: Any, state: Any) -> None:
    """A checkpoint resumes only the run that wrote it: the same algorithm (by name, where
    the checkpoint records it) and meta-parameters and buffers of the same names and shapes
    as ``state``, all finite. Raises ``ValueError`` naming what differs."""
    where = f"resume: checkpoint {checkpoint.path}"
    saved = checkpoint.extra.get("algorithm")
    if saved is not None and saved != algorithm.name:
        raise ValueError(
            f"{where} was written by {saved!r}, not {algorithm.name!r}; resume it with {saved}"
        )
    differs = [
        f"{label}/{line}"
        for label in ("meta_params", "buffers")
        for line in tree.differences(
            getattr(state, label), getattr(checkpoint.state, label), ("state", "checkpoint")
        )
    ]
    if differs:
        shown = "; ".join(differs[:6]) + (
            f"; ... ({len(differs)} in all)" if len(differs) > 6 else ""
        )
        raise ValueError(
            f"{where} does not fit the state given (another model or algorithm?): {shown}"
        )
    if not all_finite(checkpoint.state.meta_params):
        raise ValueError(
            f"{where} holds NaN or infinite meta-parameters (fit never saves such a state; an "
            "older version did): resume from an earlier checkpoint"
        )


def check_new_run_directory(directory: Path) -> None:
    """A new run (no ``resume``) must not write its checkpoints where another run's are:
    ``best.pt`` of the old run would survive a new run that never improves on it, and
    ``last.pt`` be replaced. Raises ``ValueError`` naming the files and the ways out."""
    found = [name for name in ("last.pt", "best.pt") if (directory / name).exists()]
    if found:
        raise ValueError(
            f"checkpoint_dir: {directory} holds the checkpoints of another run "
            f"({', '.join(found)}); pass resume={str(directory / 'last.pt')!r} to continue it, "
            "or another checkpoint_dir (or remove them)"
        )


_ORDER = {"step": 0, "validation": 1, "epoch": 2}


def metric_records(history: History) -> list[dict[str, Any]]:
    """Every record of ``history`` as ``{"kind": "step" | "validation" | "epoch", **record}``,
    in the order ``fit`` made them (by step; at one step: the update, its validation, the
    end of the epoch)."""
    kinds = {"step": history.steps, "validation": history.validations, "epoch": history.epochs}
    records = [{"kind": kind, **record} for kind, rows in kinds.items() for record in rows]
    return sorted(records, key=lambda r: (r["step"], _ORDER[r["kind"]]))


def write_metrics(history: History, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``metrics.jsonl`` (one JSON object per line, ``"kind"``: ``"step"``,
    ``"validation"`` or ``"epoch"``, in the order of :func:`metric_records`: the file
    :class:`~functional_meta.loggers.MetricsFile` writes as the run goes), ``metrics.csv``
    (per step, scalar columns) and ``epochs.csv`` (per epoch) to ``directory``, each
    atomically; returns the paths written."""
    from functional_meta.checkpoint import atomic_write

    directory = Path(directory)
    lines = "".join(json.dumps(record) + "\n" for record in metric_records(history))
    written = [atomic_write(directory / "metrics.jsonl", lambda h: h.write(lines.encode()))]
    for name, records in (("metrics.csv", history.steps), ("epochs.csv", history.epochs)):
        columns: list[str] = []
        for record in records:
            columns += [
                k for k, v in record.items() if k not in columns and not isinstance(v, list | dict)
            ]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        data = text.getvalue().encode()
        written.append(atomic_write(directory / name, lambda h, data=data: h.write(data)))
    return written
