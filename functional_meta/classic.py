"""The class-based API of the original implementations, on top of the pure core.

::

    maml = MAML(model=net, loss=nn.MSELoss(), inner_lr=1e-2, meta_lr=1e-3, device="cpu")
    history = maml.train(train_loader, val_loader, epochs=15, patience=3)
    result = maml.evaluate(test_tasks, steps=10)      # mean ± 95% interval
    trained = maml.module                              # an nn.Module with the meta-parameters

Each class holds an algorithm record (:class:`functional_meta.Algorithm`, built by the
registry from the class's settings), a functional model and a :class:`TrainState`; the
training itself is :func:`functional_meta.fit`. The optimizer state (and the step and
epoch counters, which MAML++'s annealing reads) survive across calls to ``.train``.
Loaders may yield :class:`TaskBatch` objects or lists of
``((support_x, support_y), (query_x, query_y))`` tuples (see ``data.tasks.as_task_batch``);
``val_loader`` is materialised once per call and scored with adaptation and no outer graph.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from functional_meta import algorithms, optim
from functional_meta.batching import Batching
from functional_meta.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from functional_meta.data.tasks import TaskBatch
from functional_meta.evaluation import EvaluationResult, evaluate, state_to
from functional_meta.export import to_module
from functional_meta.history import check_resumable
from functional_meta.inner import InnerLoop
from functional_meta.model import functionalize
from functional_meta.steps import TrainState, init_state
from functional_meta.training import Callback, FitProgress, History, as_task_batch, fit
from functional_meta.validation import check_positive_number

__all__ = ["MAML", "MetaSGD", "MetaTrainer", "Reptile"]


class MetaTrainer:
    """Shared machinery of :class:`MAML`, :class:`Reptile` and :class:`MetaSGD`.

    Args:
        model: the network (copied; the original is never modified).
        loss: ``loss(prediction, target) -> []``, e.g. ``nn.MSELoss()`` or
            ``nn.functional.cross_entropy``.
        algorithm: a name of :data:`functional_meta.algorithms.REGISTRY`.
        inner_lr, inner_steps: the inner loop (``eval_steps``: its steps at evaluation,
            default the same).
        meta_lr: the outer Adam rate (or pass ``optimizer``, a functional_meta.optim
            transformation).
        clipping: clip the meta-gradient's global norm (``None``: no clipping).
        inner_clip: clip each inner gradient's global norm.
        device: where the parameters and tasks live.
        strategy, chunk_size: how tasks are batched (``"auto"``, ``"vmap"`` or ``"loop"``).
        seed: seeds the generator used for Reptile's inner mini-batches.
        options: the algorithm's own options (``functional_meta.algorithms.options``).
    """

    algorithm: str = "maml"

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        algorithm: str | None = None,
        inner_lr: float = 1e-2,
        meta_lr: float = 1e-3,
        inner_steps: int = 1,
        eval_steps: int | None = None,
        clipping: float | None = None,
        inner_clip: float | None = None,
        optimizer: optim.GradientTransformation | None = None,
        device: str | torch.device = "cpu",
        strategy: str = "auto",
        chunk_size: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if loss is None:
            loss = nn.MSELoss()
        if not callable(loss):
            raise TypeError(
                f"loss: expected a callable loss(prediction, target), got {type(loss).__name__}"
            )
        if eval_steps is not None and (
            isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps < 0
        ):
            raise ValueError(f"eval_steps: expected None or an integer >= 0, got {eval_steps!r}")
        if clipping is not None:
            optim.clip_by_global_norm(clipping)  # validates: a positive finite number
        check_positive_number("inner_lr", inner_lr)
        self.device = torch.device(device)
        self.loss = loss
        self.clipping = clipping
        self.eval_steps = eval_steps
        self._template = copy.deepcopy(model)
        self.apply, params, buffers = functionalize(model)
        self.algorithm = algorithms.build(
            algorithm or self.algorithm, self.apply, loss,
            InnerLoop(lr=inner_lr, steps=inner_steps, clip=inner_clip),
            batching=Batching(strategy, chunk_size), **options,
        )  # fmt: skip
        self.optimizer = optimizer if optimizer is not None else optim.adam(meta_lr)
        params = {k: v.to(self.device) for k, v in params.items()}
        buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.state: TrainState = init_state(self.algorithm, params, buffers, self.optimizer)
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = FitProgress()  # step and epoch counters carried across .train calls
        self.history: History | None = None

    # -- training ------------------------------------------------------------------------
    def train(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        epochs: int = 1,
        *,
        steps_per_epoch: int | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        val_every: int | None = None,
        restore_best: bool = True,
        progress: bool | None = None,
        callback: Callback | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> History:
        """Meta-train for ``epochs`` more epochs over ``train_loader`` (re-iterated each
        epoch; or a callable ``sample(generator)`` with ``steps_per_epoch``), validating on
        ``val_loader`` every epoch (or every ``val_every`` steps) with early stopping after
        ``patience`` validations without an improvement above ``min_delta`` (the best state
        is kept). Returns this call's :class:`History` (also in ``self.history``)."""
        val_tasks = None
        if val_loader is not None:
            val_tasks = [as_task_batch(item) for item in val_loader]
            if not val_tasks:
                raise ValueError("val_loader: yielded no batches")
        start = FitProgress(step=self.progress.step, epoch=self.progress.epoch)
        result = fit(
            self.algorithm, self.state, train_loader, optimizer=self.optimizer, epochs=start.epoch + epochs, steps_per_epoch=steps_per_epoch,
            generator=self.generator, val_tasks=val_tasks, val_every=val_every,
            val_steps=self.eval_steps, patience=patience, min_delta=min_delta,
            restore_best=restore_best, clip_norm=self.clipping, device=self.device,
            progress=progress, callback=callback, checkpoint_dir=checkpoint_dir,
            resume=Checkpoint(self.state, start.step, start.epoch,
                              extra={"fit": start.to_dict(), "best_state": None}),
        )  # fmt: skip
        self.state = result.state
        self.progress = FitProgress(step=result.progress.step, epoch=result.progress.epoch)
        self.history = result.history
        return result.history

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(
        self, tasks: Iterable[Any], steps: int | None = None, num_tasks: int | None = None
    ) -> EvaluationResult:
        """Adapt on each task's support set (``steps``, default ``eval_steps`` or the
        training steps; 0: no adaptation) and score its query set: mean loss, accuracy and
        95% intervals over the tasks."""
        if isinstance(tasks, TaskBatch):
            batches = [tasks]
        elif isinstance(tasks, Iterable):
            batches = [as_task_batch(item) for item in tasks]
        else:
            raise TypeError(
                f"tasks: expected a TaskBatch or an iterable of batches, got {type(tasks).__name__}"
            )
        steps = self.eval_steps if steps is None else steps
        return evaluate(self.algorithm, self.state, batches, steps=steps, num_tasks=num_tasks,
                        device=self.device)  # fmt: skip

    # -- the model -----------------------------------------------------------------------
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The meta-parameters ``{name: tensor}`` (MAML++: with a stage axis on BN weights)."""
        return self.state.meta_params["params"]

    @property
    def module(self) -> nn.Module:
        """A copy of the model holding the meta-parameters, in ``.eval()`` mode with batch
        norm on batch statistics as in training (MAML++: its first stage); see
        :func:`functional_meta.export.to_module` for the other choices."""
        return to_module(self._template, self.params, self.state.buffers)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state, counters and generator to ``path`` atomically."""
        save_checkpoint(path, self.state, step=self.progress.step, epoch=self.progress.epoch,
                        generators={"tasks": self.generator},
                        config={"class": type(self).__name__, "algorithm": self.algorithm.name},
                        extra={"algorithm": self.algorithm.name})  # fmt: skip

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read what :meth:`save` wrote (same model and settings): a checkpoint of another
        algorithm or of other parameter names or shapes is refused naming the difference."""
        checkpoint = load_checkpoint(path)
        check_resumable(checkpoint, self.algorithm, self.state)
        self.state = state_to(checkpoint.state, self.device)
        self.progress = FitProgress(step=checkpoint.step, epoch=checkpoint.epoch)
        if "tasks" in checkpoint.generators:
            checkpoint.restore_generator(self.generator)


class MAML(MetaTrainer):
    """MAML (Finn et al. 2017); ``first_order=True`` for FOMAML, ``maml_plus_plus=True`` for
    MAML++ (its switches as further keyword options, see ``algorithms.mamlpp``; inner steps
    5 and inner rate 0.1 unless given), ``anil=True`` to adapt only the ``head``."""

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        maml_plus_plus: bool = False,
        first_order: bool = False,
        anil: bool = False,
        **options: Any,
    ) -> None:
        if sum(map(bool, (maml_plus_plus, first_order, anil))) > 1:
            raise ValueError("maml_plus_plus, first_order, anil: choose at most one")
        algorithm = (
            "mamlpp" if maml_plus_plus else "fomaml" if first_order else "anil" if anil else "maml"
        )
        if maml_plus_plus:
            options.setdefault("inner_steps", 5)
            options.setdefault("inner_lr", 0.1)
        super().__init__(model, loss, algorithm=algorithm, **options)


class Reptile(MetaTrainer):
    """Reptile (Nichol et al. 2018): ``inner_steps`` (default 5) SGD steps per task, the
    meta-update moves toward the adapted weights; ``inner_batch_size`` draws inner
    mini-batches; ``use_query`` adapts on support and query together."""

    algorithm = "reptile"

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        inner_steps: int = 5,
        inner_batch_size: int | None = None,
        use_query: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(model, loss, inner_steps=inner_steps, batch_size=inner_batch_size,
                         use_query=use_query, **options)  # fmt: skip


class MetaSGD(MetaTrainer):
    """Meta-SGD (Li et al. 2017): per-weight inner rates, learned with the weights and
    initialised at ``inner_lr``."""

    algorithm = "metasgd"
