"""A model that is ``head(body(x))``, split so that the body runs once per input.

ANIL adapts only the head, so within one task the body's output on the support set is the
same at every inner step: ``L_support(θ_body, θ_head) = ℓ(head(θ_head, body(θ_body, x)))``.
Running the body once per task and input, and the inner loop on the head alone, is the same
function of ``(θ_body, θ_head)`` (the same operations, so the same derivatives, second order
included) with ``inner.steps − 1`` fewer passes through the body per task, in training and
at evaluation.

The split is exact when the head is applied last to the body's output: an
``nn.Sequential`` whose last child is the head, as :func:`~functional_meta.models.conv4`
and :func:`~functional_meta.models.mlp` build. :func:`split_head` returns ``None`` for any
other model, and the caller runs the whole model instead.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

from torch import nn

from functional_meta.data.tasks import Task
from functional_meta.inner import Apply, Params
from functional_meta.model import FunctionalModel, draws_randomness, evaluation_mode

__all__ = ["BodyAndHead", "split_head", "without_head"]


class BodyAndHead(NamedTuple):
    """``model(p, b, x) == head(p_head, b_head, body(p_body, b_body, x))``.

    ``body`` keeps the model's parameter and buffer names less the head's; ``head``'s names
    are the head's without ``prefix`` (``"head."``)."""

    body: FunctionalModel
    head: FunctionalModel
    prefix: str

    def split(self, values: Params) -> tuple[Params, Params]:
        """``(body part, head part)`` of a dict keyed by the model's names."""
        n = len(self.prefix)
        body = {k: v for k, v in values.items() if not k.startswith(self.prefix)}
        head = {k[n:]: v for k, v in values.items() if k.startswith(self.prefix)}
        return body, head

    def join(self, body: Params, head: Params) -> Params:
        """The model's dict from its parts (the inverse of :meth:`split`)."""
        return {**body, **{self.prefix + k: v for k, v in head.items()}}

    def features(self, params: Params, buffers: Params, task: Task) -> tuple[Params, Params, Task]:
        """``(head params, head buffers, task)`` with the task's inputs replaced by the body's
        outputs on them: support and query in separate passes, as the whole model runs them
        (batch norm on batch statistics sees the same batches)."""
        body_params, head_params = self.split(params)
        body_buffers, head_buffers = self.split(buffers)
        support = self.body(body_params, body_buffers, task.support_x)
        query = self.body(body_params, body_buffers, task.query_x)
        return head_params, head_buffers, Task(support, task.support_y, query, task.query_y)

    def evaluation(self) -> BodyAndHead:
        """The same split in evaluation mode (dropout off)."""
        return self._replace(body=evaluation_mode(self.body), head=evaluation_mode(self.head))


def without_head(model: FunctionalModel, head: str) -> FunctionalModel:
    """``model`` with its submodule ``head`` (a name such as ``"head"`` or ``"block.fc"``,
    which must exist) replaced by the identity, over a copy of its module: the body, whose
    parameter and buffer names are the model's less the head's."""
    module = copy.deepcopy(model.module)
    parent_name, _, child = head.rpartition(".")
    setattr(module.get_submodule(parent_name), child, nn.Identity())
    return FunctionalModel(module, model.batch_norm)


def split_head(model: Apply, head: str) -> BodyAndHead | None:
    """``model`` split into body and head when it is a :class:`FunctionalModel` of an
    ``nn.Sequential`` whose last child is named ``head`` (the prefix without its dot), whose
    parameters starting with ``head`` are exactly that child's, and which draws no random
    numbers; ``None`` otherwise (the whole model must run)."""
    if not isinstance(model, FunctionalModel) or draws_randomness(model):
        return None
    module = model.module
    children = list(module.named_children())
    name = head[:-1] if head.endswith(".") else head
    if not isinstance(module, nn.Sequential) or not children or children[-1][0] != name:
        return None
    named = {n for n in model.param_names | model.buffer_names if n.startswith(head)}
    if named != {n for n in model.param_names | model.buffer_names if n.startswith(name + ".")}:
        return None
    return BodyAndHead(
        without_head(model, name),
        FunctionalModel(copy.deepcopy(children[-1][1]), model.batch_norm),
        name + ".",
    )
