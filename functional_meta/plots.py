"""Figures as PNG files (needs matplotlib: ``pip install 'functional-meta[plots]'``).

matplotlib is imported when a function here is called, never by ``import functional_meta``;
figures are drawn with the object-oriented API on an Agg canvas (no pyplot, no global
backend state, no display needed).

- :func:`plot_sinusoid`: one sinusoid task — the true function, the support points and the
  model's prediction before adaptation and after 1 and 10 inner steps.
- :func:`plot_learning_curves`: the meta-training loss per step and the validation loss and
  accuracy per validation, from a :class:`functional_meta.training.History`.
- :func:`plot_validation_curves`: several runs' validation scores against wall time, one
  panel per setting (comparing algorithms).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from functional_meta.data.sinusoid import sample_sinusoids
from functional_meta.steps import Algorithm, TrainState
from functional_meta.tree import detach

__all__ = ["adapted_predictions", "plot_learning_curves", "plot_sinusoid", "plot_validation_curves"]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'functional-meta[plots]'") from error
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def adapted_predictions(
    algorithm: Algorithm,
    state: TrainState,
    *,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    x: torch.Tensor,
    steps: Sequence[int] = (0, 1, 10),
) -> dict[int, torch.Tensor]:
    """The model's predictions at ``x [P, ...]`` after adapting on one task's support set
    ``support_x [S, ...]``, ``support_y [S, ...]`` for each number of inner steps in
    ``steps`` (0: the meta-parameters themselves), through the record's ``adapt`` and
    ``predict`` (as evaluation adapts). Returns ``{steps: prediction [P, ...]}``, detached."""
    meta_params, buffers = detach(state.meta_params), detach(state.buffers)
    out: dict[int, torch.Tensor] = {}
    for k in steps:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"steps: expected integers >= 0, got {k!r}")
        with torch.no_grad():
            adapted = algorithm.adapt(meta_params, buffers, support_x, support_y, k)
            out[k] = algorithm.predict(adapted, x).detach()
    return out


def plot_sinusoid(
    algorithm: Algorithm,
    state: TrainState,
    path: str | os.PathLike[str],
    *,
    seed: int = 1,
    support: int = 10,
    steps: Sequence[int] = (0, 1, 10),
    title: str | None = None,
) -> Path:
    """Draw one sinusoid task (drawn from ``seed``, ``support`` points): the true function,
    the support points, and the predictions after each of ``steps`` inner steps. Writes a
    PNG to ``path`` and returns it."""
    drawn = sample_sinusoids(1, support, 1, generator=seed)
    task = drawn.tasks[0]
    device = next(iter(state.meta_params["params"].values())).device
    grid = torch.linspace(-5.0, 5.0, 200)
    predictions = adapted_predictions(
        algorithm, state, support_x=task.support_x.to(device),
        support_y=task.support_y.to(device), x=grid.view(-1, 1).to(device), steps=steps,
    )  # fmt: skip
    figure = _figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(grid, drawn(grid)[0], color="black", linewidth=2, label="true function")
    styles = ["--", "-.", "-", ":"]
    for i, (k, prediction) in enumerate(predictions.items()):
        label = "before adaptation" if k == 0 else f"after {k} step{'s' * (k != 1)}"
        axes.plot(grid, prediction.cpu().view(-1), styles[i % 4], label=label)
    axes.scatter(task.support_x.view(-1), task.support_y.view(-1), color="red", zorder=3,
                 label=f"{support} support points")  # fmt: skip
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.set_title(title or f"sinusoid task, {algorithm.name}")
    axes.legend(loc="best", fontsize="small")
    return _save(figure, path)


def plot_learning_curves(history: Any, path: str | os.PathLike[str]) -> Path:
    """Meta-training loss per step (and its moving average) and the validation loss /
    accuracy per validation, from a ``History`` (or its ``to_dict()``). Writes a PNG."""
    steps = history["steps"] if isinstance(history, dict) else history.steps
    validations = history["validations"] if isinstance(history, dict) else history.validations
    has_accuracy = any("val_accuracy" in v for v in validations)
    figure = _figure(11 if has_accuracy else 7, 4)
    columns = 2 if has_accuracy else 1
    axes = figure.add_subplot(1, columns, 1)
    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        axes.plot(x, y, alpha=0.3, label="meta-train query loss")
        window = max(1, len(y) // 50)
        if window > 1:
            smooth = torch.tensor(y, dtype=torch.float64).unfold(0, window, 1).mean(1).tolist()
            axes.plot(x[window - 1 :], smooth, label=f"moving average ({window})")
    if validations:
        inner = validations[-1].get("val_steps")
        label = "validation loss" + (f" ({inner} inner steps)" if inner is not None else "")
        axes.plot([v["step"] for v in validations], [v["val_loss"] for v in validations], "o-",
                  label=label)  # fmt: skip
    axes.set_xlabel("meta-update")
    axes.set_ylabel("loss")
    axes.set_yscale("log" if steps and min(r["loss"] for r in steps) > 0 else "linear")
    axes.legend(loc="best", fontsize="small")
    if has_accuracy:
        right = figure.add_subplot(1, 2, 2)
        if steps and "accuracy" in steps[0]:
            right.plot([r["step"] for r in steps], [r["accuracy"] for r in steps], alpha=0.3,
                       label="meta-train accuracy")  # fmt: skip
        right.plot([v["step"] for v in validations if "val_accuracy" in v],
                   [v["val_accuracy"] for v in validations if "val_accuracy" in v], "o-",
                   label="validation accuracy")  # fmt: skip
        right.set_xlabel("meta-update")
        right.set_ylabel("accuracy")
        right.legend(loc="best", fontsize="small")
    return _save(figure, path)


def plot_validation_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str = "wall time of meta-training (minutes)",
    ylabel: str = "validation accuracy",
) -> Path:
    """One panel per setting, one line per run: ``panels[title][label] = (x, y)``, e.g. the
    minutes since meta-training began and the validation accuracy there. Writes a PNG."""
    if not panels:
        raise ValueError("plot_validation_curves: panels is empty")
    figure = _figure(5.5 * len(panels), 4)
    for i, (title, runs) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(1, len(panels), i)
        for label, (x, y) in runs.items():
            axes.plot(x, y, "o-", markersize=3, label=label)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)
