"""ANIL (Raghu, Raghu, Bengio and Vinyals 2020, "Rapid learning or feature reuse?").

MAML whose inner loop adapts only the network's head; the body is meta-learned but never
adapted (the paper's "almost no inner loop"):

    θ'_head = θ_head − α ∇_{θ_head} L_support(θ_body, θ_head)
    min_θ (1/T) Σ_i L_query,i(θ_body, θ'_head,i)

The head is every parameter whose name starts with ``head`` (``"head."`` for the
library's :func:`~functional_meta.models.mlp` and :func:`~functional_meta.models.conv4`).
"""

from __future__ import annotations

from dataclasses import replace

from functional_meta.algorithms.maml import gradient_based
from functional_meta.batching import Batching
from functional_meta.body_and_head import split_head
from functional_meta.checks import check_algorithm_parts
from functional_meta.inner import Apply, InnerLoop, LossFn, plain_forward
from functional_meta.model import FunctionalModel
from functional_meta.steps import Algorithm

__all__ = ["anil"]


def anil(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(),
    *,
    batching: Batching = Batching(),
    head: str = "head.",
) -> Algorithm:
    """ANIL's record: :func:`~functional_meta.algorithms.maml` adapting only the parameters
    whose names start with ``head`` (``inner.adapted`` is replaced).

    When the model is ``head(body(x))`` (:func:`~functional_meta.body_and_head.split_head`:
    an ``nn.Sequential`` ending in the head, as the library's models are) the body runs
    once per task and input and the inner loop runs on the head alone: the same function
    and derivatives, ``inner.steps − 1`` fewer body passes per task. Otherwise the whole
    model runs at every inner step."""
    check_algorithm_parts(model, loss, inner, batching)
    if not isinstance(head, str) or not head:
        raise ValueError(f"head: expected a non-empty name prefix, got {head!r}")
    if isinstance(model, FunctionalModel) and not any(
        n.startswith(head) for n in model.param_names
    ):
        raise ValueError(
            f"head: no parameter name starts with {head!r}; names: {sorted(model.param_names)}"
        )
    inner = replace(inner, adapted=lambda name: name.startswith(head))
    split = split_head(model, head) if inner.forward is plain_forward else None
    return gradient_based("anil", model, loss, inner, batching, body_and_head=split)
