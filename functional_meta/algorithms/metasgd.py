"""Meta-SGD (Li, Zhou, Chen and Li 2017): the inner rates are meta-learned, one per weight.

    θ' = θ − α ⊙ ∇_θ L_support(θ)                                        (eq. 4)
    min_{θ, α} (1/T) Σ_i L_query,i(θ'_i)                                  (eq. 5)

``α`` has the shape of ``θ`` (one rate per weight), initialised at ``inner.lr`` and trained
with ``θ`` by the outer optimizer. With ``per_step_rates`` (the default) each inner step
has its own ``α_t``; evaluating with more steps than trained reuses the last step's rates,
so evaluation defaults to the trained number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from functional_meta.algorithms.maml import gradient_based
from functional_meta.batching import Batching
from functional_meta.checks import check_algorithm_parts, check_rates
from functional_meta.inner import Apply, InnerLoop, LossFn, Params, Rates
from functional_meta.steps import Algorithm, own_loop
from functional_meta.tree import select_names
from functional_meta.validation import check_count, check_positive_number

__all__ = ["learned_rates", "metasgd", "metasgd_grad", "metasgd_init", "metasgd_step"]

MetaParams = dict[str, Any]
KEYS = frozenset({"params", "inner_lr"})


def learned_rates(per_step: bool | None) -> Callable[[MetaParams], Rates]:
    """The inner rates stored in ``meta_params["inner_lr"]``: ``α[name]`` (shared by every
    step) or, per step, ``α[name][t]`` (the last step's beyond the trained steps).
    ``per_step=None`` tells them apart by shape: Meta-SGD's per-step rates have one axis
    more than their parameter."""

    def rates(meta_params: MetaParams) -> Rates:
        alpha: Mapping[str, torch.Tensor] = meta_params["inner_lr"]
        params = meta_params["params"]

        def rate(name: str, t: int) -> torch.Tensor:
            stepped = per_step if per_step is not None else alpha[name].dim() > params[name].dim()
            return alpha[name][min(t, alpha[name].shape[0] - 1)] if stepped else alpha[name]

        return rate

    return rates


def metasgd_init(
    params: Params,
    inner_lr: float = 0.01,
    *,
    steps: int | None = None,
    adapted: Collection[str] | Callable[[str], bool] | None = None,
) -> MetaParams:
    """Meta-SGD's meta-parameters ``{"params": θ, "inner_lr": α}`` (Li et al. 2017).

    ``α`` has one learnable rate per weight (``α[name]`` shaped like ``θ[name]``), all set to
    ``inner_lr``; with ``steps`` it gets a leading step axis (one rate per weight per step).
    Only the ``adapted`` parameters get rates.
    """
    check_positive_number("metasgd_init: inner_lr", inner_lr)
    lead = () if steps is None else (check_count("metasgd_init: steps", steps),)
    rates = {
        name: torch.full(
            (*lead, *params[name].shape),
            float(inner_lr),
            dtype=params[name].dtype,
            device=params[name].device,
        )
        for name in sorted(select_names(params, adapted))
    }
    return {"params": {k: v.clone() for k, v in params.items()}, "inner_lr": rates}


def metasgd(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(),
    *,
    batching: Batching = Batching(),
    per_step_rates: bool = True,
) -> Algorithm:
    """Meta-SGD's record: rates for ``inner.adapted`` initialised at ``inner.lr``, one per
    weight (and per step with ``per_step_rates``), learned with the weights. The rates scale
    the plain SGD step: an ``inner.optimizer`` is refused (``ValueError``)."""
    check_algorithm_parts(model, loss, inner, batching)
    inner.refuse_optimizer("metasgd")

    def init(params: Params, buffers: Params) -> tuple[MetaParams, Params]:
        steps = inner.steps if per_step_rates else None
        meta = metasgd_init(params, inner.lr, steps=steps, adapted=inner.adapted)
        return meta, dict(buffers)

    def check(meta_params: MetaParams, names: frozenset[str]) -> None:
        check_rates(meta_params["inner_lr"], meta_params["params"], names, inner.steps, None)

    return gradient_based(
        "metasgd", model, loss, inner, batching, init=init, keys=KEYS,
        rates=learned_rates(None), check=check, extends_steps=False,
    )  # fmt: skip


metasgd_grad, metasgd_step = own_loop(metasgd, plain_params=False)
metasgd_grad.__doc__ = """Meta-SGD's meta-gradient with respect to both ``θ`` and the rates ``α``,
for a user's own loop: ``meta_params`` from :func:`metasgd_init`, keyword options as
``maml_grad``'s (``inner.adapted`` must select the parameters that have rates; ``inner.lr``
is not used). Returns ``(grads, metrics)`` shaped like ``meta_params``."""
metasgd_step.__doc__ = """One Meta-SGD meta-update of ``θ`` and ``α`` together:
:func:`metasgd_grad` (same keyword options) then ``optimizer``. Returns ``(meta_params,
opt_state, metrics)``."""
