"""What a ``fit`` run records: its :class:`History`, the loop state a checkpoint keeps
(:class:`FitProgress`), and the metric files (written as the run goes by
:class:`functional_meta.loggers.MetricsFile`, all at once by :func:`write_metrics`)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FitProgress", "History", "metric_records", "write_metrics"]


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
    ``bad_validations``; the :class:`History`.
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
