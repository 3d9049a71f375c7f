"""Prototypical Networks (Snell, Swersky and Zemel 2017): classify by distance to class means.

An embedding network ``f_θ`` maps each support example to a vector; the prototype of
class ``k`` is the mean embedding of its support examples (eq. 1), and a query is
classified by a softmax over negative squared Euclidean distances (eq. 2):

    c_k = (1/|S_k|) Σ_{(x_j, y_j) ∈ S, y_j = k} f_θ(x_j)
    p(y = k | x) ∝ exp(−‖f_θ(x) − c_k‖²)
    min_θ (1/T) Σ_i L_query,i,    L = loss(−‖f_θ(x) − c‖², y)  (cross-entropy: eq. 2's NLL)

There is no inner loop: ``adapt`` computes the prototypes, ``predict`` the logits. The
record's ``inner_steps`` is 0 and evaluation takes no steps (``steps`` must be ``None`` or
``0``). The embedding is the model without its classification layer (the submodule
``head``, as the library's :func:`~functional_meta.models.conv4` and
:func:`~functional_meta.models.mlp` name it; ``head=None`` embeds with the whole model).

**Classes.** Labels are ``0 .. S−1`` for ``S`` support examples (N-way K-shot tasks label
``0 .. N−1``), so prototypes have a shape known before the labels are read and the record
runs under ``vmap``: the logits are ``[N, S]``, column ``k`` for class ``k``, ``−inf``
for a class with no support example. Every query label must occur in the support set.
With batch norm in batch mode, the support and the query are embedded in separate
forwards (each normalised with its own statistics), in training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functional_meta.batching import Batching
from functional_meta.body_and_head import without_head
from functional_meta.checks import check_algorithm_parts, check_meta_params, check_tasks
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import Apply, InnerLoop, LossFn, Params
from functional_meta.losses import scores
from functional_meta.model import FunctionalModel
from functional_meta.steps import Algorithm, Gradient, keep_buffers, loss_gradient

__all__ = ["Prototypes", "embedding_model", "protonets", "prototype_logits", "prototypes"]

KEYS = frozenset({"params"})


class Prototypes(NamedTuple):
    """One task's adaptation: the embedding's ``params`` and ``buffers``, the class
    ``means [S, D]`` and the support ``counts [S]`` per class (0: no such class)."""

    params: Params
    buffers: Params
    means: torch.Tensor
    counts: torch.Tensor


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means of ``embeddings [S, D]`` by ``labels [S]`` (integers in ``0 .. S−1``):
    ``(means [S, D], counts [S])``, a class without examples has mean 0 and count 0."""
    size = labels.shape[0]
    members = (labels.unsqueeze(1) == torch.arange(size, device=labels.device)).to(embeddings)
    counts = members.sum(dim=0)
    return members.T @ embeddings / counts.clamp(min=1).unsqueeze(1), counts


def prototype_logits(
    embeddings: torch.Tensor, means: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``−‖embeddings[n] − means[k]‖²`` as ``[N, S]`` logits; ``−inf`` where ``counts[k]``
    is 0 (a class that has no prototype)."""
    distances = (embeddings.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(dim=-1)
    return torch.where(counts > 0, -distances, float("-inf"))


def embedding_model(model: Apply, head: str | None) -> Apply:
    """``model`` with its submodule ``head`` replaced by the identity (``head=None``:
    ``model`` itself). Needs a :class:`~functional_meta.model.FunctionalModel` to drop a
    head; its parameter and buffer names are the model's less the head's."""
    if head is None:
        return model
    if not isinstance(head, str) or not head:
        raise ValueError(f"head: expected None or a submodule name such as 'head', got {head!r}")
    if not isinstance(model, FunctionalModel):
        raise TypeError(
            f"model: dropping the head {head!r} needs a functionalize()d model, got "
            f"{type(model).__name__}; pass head=None to embed with the whole model"
        )
    try:
        model.module.get_submodule(head)
    except AttributeError:
        children = [name for name, _ in model.module.named_children()]
        raise ValueError(
            f"head: the model has no submodule {head!r} (its children: {children}); pass "
            "head=None to embed with the whole model"
        ) from None
    return without_head(model, head)


def _check_labels(tasks: TaskBatch) -> None:
    """Labels are class indices in ``0 .. S−1`` (a :class:`TaskBatch` has no negative
    ones) and every query label has a prototype (one host synchronisation)."""
    for name in ("support_y", "query_y"):
        labels = getattr(tasks, name)
        if labels.dtype != torch.long:
            raise TypeError(
                f"tasks.{name}: prototypical networks classify; expected torch.long class "
                f"labels, got {labels.dtype}"
            )
    size = tasks.support_y.shape[1]
    classes = torch.arange(size, device=tasks.support_y.device)
    counts = (tasks.support_y.unsqueeze(-1) == classes).sum(dim=1)  # [T, S]
    present = (tasks.query_y < size) & (counts.gather(1, tasks.query_y.clamp(max=size - 1)) > 0)
    flags = torch.stack([(tasks.support_y < size).all(), present.all()]).tolist()
    if not flags[0]:
        raise ValueError(
            f"tasks.support_y: expected class labels in 0..{size - 1} (at most one class per "
            "support example)"
        )
    if not flags[1]:
        raise ValueError(
            "tasks.query_y: every query label must be a class of the task's support set (it "
            "needs a prototype)"
        )


def protonets(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(),
    *,
    batching: Batching = Batching(),
    head: str | None = "head",
) -> Algorithm:
    """The Prototypical Networks record (the module docstring has the equations).

    ``model`` is the classifier whose body embeds (``head``: the submodule left out;
    ``None``: the whole model embeds); ``loss(logits [N, S], labels [N])`` scores the
    negative squared distances (``F.cross_entropy``: the paper's objective). ``inner`` is
    not used: there is no inner loop. Metrics: ``loss`` (= ``query_loss``), ``accuracy``.
    """
    check_algorithm_parts(model, loss, inner, batching)
    embed = embedding_model(model, head)

    def init(params: Params, buffers: Params) -> tuple[dict[str, Any], Params]:
        if isinstance(embed, FunctionalModel):
            params = {k: v for k, v in params.items() if k in embed.param_names}
            buffers = {k: v for k, v in buffers.items() if k in embed.buffer_names}
        return {"params": {k: v.clone() for k, v in params.items()}}, dict(buffers)

    def adapt(
        meta_params: dict[str, Any],
        buffers: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
    ) -> Prototypes:
        if steps not in (None, 0):
            raise ValueError(
                f"steps: prototypical networks have no inner loop; expected None or 0, got {steps!r}"
            )
        if support_y.dtype.is_floating_point:
            raise ValueError(
                "support_y: prototypical networks classify; expected integer class labels, "
                f"got {support_y.dtype} targets"
            )
        params = meta_params["params"]
        means, counts = prototypes(embed(params, buffers, support_x), support_y)
        return Prototypes(params, buffers, means, counts)

    def predict(adapted: Prototypes, x: torch.Tensor) -> torch.Tensor:
        embeddings = embed(adapted.params, adapted.buffers, x)
        return prototype_logits(embeddings, adapted.means, adapted.counts)

    def objective(
        meta_params: dict[str, Any],
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Callable[[dict[str, Any], Task], tuple[torch.Tensor, dict[str, Any]]]:
        check_tasks(tasks)
        check_meta_params(meta_params, KEYS)
        if isinstance(embed, FunctionalModel):
            embed.check(meta_params["params"], buffers)
        _check_labels(tasks)

        def task_loss(meta: dict[str, Any], task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
            adapted = adapt(meta, buffers, task.support_x, task.support_y)
            result = scores(predict(adapted, task.query_x), task.query_y, loss)
            objective = result.pop("loss")
            return objective, {"query_loss": objective.detach(), **{
                k: v.detach() for k, v in result.items()}}  # fmt: skip

        return task_loss

    def grad(
        meta_params: dict[str, Any],
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Gradient:
        task_loss = objective(meta_params, buffers, tasks, epoch=epoch, generator=generator)
        return loss_gradient(task_loss, meta_params, tasks, batching, embed)

    return Algorithm(
        name="protonets", init=init, grad=grad, adapt=adapt, predict=predict,
        after_update=keep_buffers, loss=loss, model=embed, batching=batching,
        inner_steps=0, extends_steps=False, objective=objective,
    )  # fmt: skip
