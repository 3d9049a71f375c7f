"""What a ``fit`` run records and shows: its :class:`History`, the loop state a checkpoint
keeps (:class:`FitProgress`) and what resuming from one checks, the progress bar, and the
metric files."""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from functional_meta import tree
from functional_meta.validation import all_finite

__all__ = ["FitProgress", "History", "check_resumable", "postfix", "progress_bar", "write_metrics"]


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


def progress_bar(enabled: bool | None, total: int | None, initial: int) -> Any:
    """A tqdm bar (``None``: off, or not on a terminal when ``enabled`` is None, or tqdm
    is not installed)."""
    if enabled is False:
        return None
    if enabled is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            warnings.warn(
                "progress=True needs tqdm (pip install 'functional-meta[progress]'); no bar",
                stacklevel=3,
            )
        return None
    return tqdm(total=total, initial=initial, desc="meta-train", unit="step", dynamic_ncols=True)


def postfix(history: History) -> str:
    """The bar's text: the last step's loss and accuracy and the last validation's."""
    parts = []
    if history.steps:
        last = history.steps[-1]
        parts.append(f"loss={last['loss']:.4g}")
        if "accuracy" in last:
            parts.append(f"acc={last['accuracy']:.3f}")
    if history.validations:
        last = history.validations[-1]
        parts.append(f"val_loss={last['val_loss']:.4g}")
        if "val_accuracy" in last:
            parts.append(f"val_acc={last['val_accuracy']:.3f}")
    return " ".join(parts)


def write_metrics(history: History, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``metrics.jsonl`` (one JSON object per line, ``"kind"``: ``"step"``,
    ``"validation"`` or ``"epoch"``), ``metrics.csv`` (per step, scalar columns) and
    ``epochs.csv`` (per epoch) to ``directory``; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jsonl = directory / "metrics.jsonl"
    with open(jsonl, "w") as handle:
        for kind, records in (("step", history.steps), ("validation", history.validations),
                              ("epoch", history.epochs)):  # fmt: skip
            for record in records:
                handle.write(json.dumps({"kind": kind, **record}) + "\n")
    written = [jsonl]
    for name, records in (("metrics.csv", history.steps), ("epochs.csv", history.epochs)):
        columns: list[str] = []
        for record in records:
            columns += [
                k for k, v in record.items() if k not in columns and not isinstance(v, list | dict)
            ]
        path = directory / name
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
        written.append(path)
    return written
