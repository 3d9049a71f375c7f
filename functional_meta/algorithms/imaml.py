"""iMAML (Rajeswaran, Finn, Kakade and Levine 2019, "Meta-learning with implicit gradients").

Each task adapts by (approximately) solving the proximal inner problem (eq. 3)

    φ*_i(θ) = argmin_φ  L_support,i(φ) + λ/2 ‖φ − θ‖²

with the library's inner loop started at ``φ_0 = θ`` (``inner.steps`` gradient steps on
that objective, first order: nothing of the trajectory is kept). The meta-gradient of
``(1/T) Σ_i L_query,i(φ*_i(θ))`` follows from the implicit function theorem (eq. 5-6):

    dφ*/dθ = (I + H/λ)^{-1},    H = ∇²_φ L_support(φ*)
    g_i = (I + H/λ)^{-1} ∇_φ L_query,i(φ*_i)

and ``g_i`` is found with ``cg_steps`` steps of conjugate gradient on the linear system
``((1 + δ) I + H/(λ + μ)) g = ∇_φ L_query`` (``δ``: ``damping``, ``μ``:
``hessian_damping``, both 0 for the exact system; the authors' code uses ``δ = 1,
μ = 10``), which needs only Hessian-vector products (:func:`hvp`, reverse over reverse).
Memory is that of one inner step and one Hessian-vector product whatever ``inner.steps``
is; time grows with ``inner.steps + cg_steps``. The equation holds at the exact inner optimum: run enough inner
steps (at a rate that converges) for ``φ`` to get there. ``I + H/λ`` is positive definite,
as conjugate gradient needs, when ``λ`` exceeds minus the smallest eigenvalue of ``H``.

Evaluation adapts as training does: the proximal inner loop from the meta-parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from functional_meta import tree
from functional_meta.algorithms.maml import Adapted, params_only
from functional_meta.autodiff import grad_and_value
from functional_meta.batching import Batching
from functional_meta.checks import check_algorithm_parts, check_meta_batch, check_support_set
from functional_meta.data.tasks import Task, TaskBatch
from functional_meta.inner import Adaptation, Apply, InnerLoop, LossFn, Params, adapt, plain_forward
from functional_meta.losses import scores
from functional_meta.steps import Algorithm, Gradient, keep_buffers, loss_gradient
from functional_meta.validation import check_count, check_number_in, check_positive_number

__all__ = ["conjugate_gradient", "hvp", "imaml", "proximal_adapt"]

KEYS = frozenset({"params"})


def _dot(a: Params, b: Params) -> torch.Tensor:
    """``Σ_name ⟨a[name], b[name]⟩``, a 0-d tensor."""
    return torch.stack([(a[name] * b[name]).sum() for name in sorted(a)]).sum()


def hvp(fn: Callable[[Params], torch.Tensor], params: Params, vector: Params) -> Params:
    """The Hessian-vector product ``∇²fn(params) · vector`` of a scalar ``fn``, as the
    gradient of ``⟨∇fn(params), vector⟩`` (reverse over reverse; ``torch.func`` inside its
    transforms, ``torch.autograd`` outside, see ``functional_meta.autodiff``). ``params``
    and ``vector`` are dicts of tensors of the same shapes; the result carries no graph."""

    def directional(point: Params) -> tuple[torch.Tensor, dict]:
        first, _ = grad_and_value(lambda p: (fn(p), {}), point, create_graph=True)
        return _dot(first, vector), {}

    product, _ = grad_and_value(directional, tree.detach(params))
    return tree.detach(product)


def _safe_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where ``denominator > 0``, else 0 (a solved system stays
    solved under ``vmap``, where the loop cannot stop early)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


def conjugate_gradient(
    matvec: Callable[[Params], Params], b: Params, steps: int
) -> tuple[Params, torch.Tensor]:
    """``steps`` iterations of conjugate gradient on ``A x = b`` from ``x = 0`` for a
    symmetric ``A`` given by ``matvec(v) = A v`` (Hestenes and Stiefel 1952), over dicts of
    tensors, safeguarded for an ``A`` that is not positive definite (the support loss's
    Hessian ``H`` has eigenvalues below ``-λ`` away from a minimum, and ``I + H/λ`` with it):

    - truncated as Newton-CG is (Steihaug 1983): at the first search direction of
      non-positive curvature ``pᵀAp <= 0`` the iterate stops changing;
    - the answer is the candidate with the smallest residual ``‖b − A x‖``: the CG iterates
      and ``x = b`` (the first-order answer, ``A ≈ I``, whose residual the first product
      ``A b`` gives for free). On an indefinite ``A`` the residual of CG's iterates need
      not fall; an iterate whose residual is many times ``‖b‖`` is many times too long
      (measured on Omniglot: one task in six, up to ``‖x‖ = 20 ‖b‖``), and one such task
      throws the meta-update off.

    A fixed number of steps and no data-dependent branch, so it runs under ``vmap``.
    Returns ``(x, relative_residual [])``, ``‖b − A x‖ / ‖b‖`` of the answer as the
    recursion tracks it (equal to the true residual in exact arithmetic)."""
    x = tree.zeros_like(b)
    residual, direction = b, b
    squared = _dot(residual, residual)
    initial = squared
    active = torch.ones((), dtype=torch.bool, device=squared.device)
    best, best_squared = b, squared  # replaced by b's residual after the first product
    for index in range(steps):
        product = matvec(direction)
        if index == 0:  # direction == b: the first-order answer's residual b − A b
            first_order = tree.sub(b, product)
            best_squared = _dot(first_order, first_order)
        curvature = _dot(direction, product)
        active = active & (curvature > 0)  # once stopped, stays stopped
        alpha = torch.where(active, _safe_div(squared, curvature), 0.0)
        x = tree.axpy(alpha, direction, x)
        residual = tree.axpy(-alpha, product, residual)
        new_squared = _dot(residual, residual)
        better = active & (new_squared < best_squared)
        best = tree.map(lambda keep, old, mask=better: torch.where(mask, keep, old), x, best)
        best_squared = torch.where(better, new_squared, best_squared)
        beta = torch.where(active, _safe_div(new_squared, squared), 0.0)
        direction = tree.axpy(beta, direction, residual)
        squared = new_squared
    return best, torch.sqrt(_safe_div(best_squared, initial))


def proximal_adapt(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop,
    regularization: float,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Adaptation:
    """``inner.steps`` first-order steps of :func:`functional_meta.adapt` on
    ``L_support(φ) + λ/2 ‖φ − θ‖²`` from ``φ_0 = θ = params`` (``λ = regularization``);
    ``θ`` is detached, so nothing of the loop is kept for an outer derivative. The proximal
    term rides with the prediction (the model's output and the parameters it ran with), so
    the inner loop itself is the library's, unchanged. ``support_losses`` are the proximal
    objective's values."""
    anchor = tree.detach(params)

    def with_params(p: Params, b: Params, inputs: torch.Tensor) -> tuple[torch.Tensor, Params]:
        return model(p, b, inputs), p

    def proximal_loss(output: tuple[torch.Tensor, Params], target: torch.Tensor) -> torch.Tensor:
        prediction, p = output
        distance = tree.sub(p, anchor)
        return loss(prediction, target) + 0.5 * regularization * _dot(distance, distance)

    first_order = replace(inner, first_order=True)
    return adapt(with_params, anchor, buffers, x, y, proximal_loss, first_order)


def imaml(
    model: Apply,
    loss: LossFn,
    inner: InnerLoop = InnerLoop(steps=10),
    *,
    batching: Batching = Batching(),
    regularization: float = 1.0,
    cg_steps: int = 5,
    damping: float = 0.0,
    hessian_damping: float = 0.0,
) -> Algorithm:
    """iMAML's record (the module docstring has the equations).

    ``regularization`` is ``λ``, the strength of the proximal term (a positive number:
    larger keeps ``φ`` closer to ``θ``); ``cg_steps`` the conjugate-gradient steps per task
    (>= 1); ``damping`` ``δ >= 0`` adds ``δ I`` to the system and ``hessian_damping``
    ``μ >= 0`` divides its Hessian term by ``λ + μ`` instead of ``λ`` (both 0: the exact
    implicit gradient; the authors' code, Rajeswaran et al.'s ``imaml_dev``, solves with
    ``δ = 1, μ = 10``: a system close to ``2 I``, a gradient close to the first-order one
    with a mild curvature correction, which keeps the solve well conditioned away from
    the inner optimum). ``inner`` is the inner loop on the proximal objective: every
    parameter adapts (``inner.adapted`` must be ``None``) with the plain forward;
    ``inner.first_order`` is irrelevant (nothing is differentiated through the loop).
    Metrics: ``loss`` and ``query_loss`` (query loss at ``φ*``), ``accuracy``,
    ``support_losses`` (the proximal objective per inner step) and ``cg_residual`` (relative
    residual of the solve).
    """
    check_algorithm_parts(model, loss, inner, batching)
    lam = check_positive_number("regularization", regularization)
    check_count("cg_steps", cg_steps)
    delta = check_number_in("damping", damping, 0.0)
    curvature = 1.0 / (lam + check_number_in("hessian_damping", hessian_damping, 0.0))
    if inner.adapted is not None:
        raise ValueError(
            "inner.adapted: iMAML adapts every parameter (its implicit gradient is that of the "
            f"whole proximal problem); expected None, got {inner.adapted!r}"
        )
    if inner.forward is not plain_forward:
        raise ValueError("inner.forward: iMAML runs the plain model; expected the default forward")

    def solve(task: Task, buffers: Params, fast: Params) -> tuple[Params, dict[str, Any]]:
        """``(I + H/λ)^{-1} ∇_φ L_query(φ*)`` and the query scores at ``φ* = fast``."""

        def query(p: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            result = scores(model(p, buffers, task.query_x), task.query_y, loss)
            return result["loss"], result

        def support(p: Params) -> torch.Tensor:
            return loss(model(p, buffers, task.support_x), task.support_y)

        query_grad, (_, result) = grad_and_value(query, tree.detach(fast))

        def system(v: Params) -> Params:  # ((1 + δ) I + H/(λ + μ)) v
            return tree.axpy(curvature, hvp(support, fast, v), tree.scale(1.0 + delta, v))

        solution, residual = conjugate_gradient(system, tree.detach(query_grad), cg_steps)
        aux = {name: value.detach() for name, value in result.items()}
        return solution, {**aux, "cg_residual": residual.detach()}

    def grad(
        meta_params: dict[str, Any],
        buffers: Params,
        tasks: TaskBatch,
        *,
        epoch: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Gradient:
        check_meta_batch(model, meta_params, KEYS, buffers, tasks)

        def task_loss(meta: dict[str, Any], task: Task) -> tuple[torch.Tensor, dict[str, Any]]:
            theta = meta["params"]
            adaptation = proximal_adapt(model, loss, inner, lam, theta, buffers,
                                        task.support_x, task.support_y)  # fmt: skip
            solution, aux = solve(task, buffers, adaptation.params)
            query_loss = aux.pop("loss")
            # Its value is the query loss; its gradient with respect to θ is the solution.
            surrogate = query_loss + _dot(solution, tree.sub(theta, tree.detach(theta)))
            return surrogate, {
                **aux,
                "query_loss": query_loss,
                "support_losses": adaptation.support_losses.detach(),
            }

        return loss_gradient(task_loss, meta_params, tasks, batching, model)

    def adapt_task(
        meta_params: dict[str, Any],
        buffers: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
    ) -> Adapted:
        check_support_set(model, support_x, support_y)
        check_count("steps", steps, minimum=0, optional=True)
        steps = inner.steps if steps is None else steps
        if steps == 0:
            return Adapted(meta_params["params"], buffers, 0)
        adaptation = proximal_adapt(model, loss, replace(inner, steps=steps), lam,
                                    meta_params["params"], buffers, support_x, support_y)  # fmt: skip
        return Adapted(adaptation.params, buffers, steps)

    def predict(adapted: Adapted, x: torch.Tensor) -> torch.Tensor:
        return model(adapted.params, adapted.buffers, x)

    return Algorithm(
        name="imaml", init=params_only, grad=grad, adapt=adapt_task, predict=predict,
        after_update=keep_buffers, loss=loss, model=model, batching=batching,
        inner_steps=inner.steps,
    )  # fmt: skip
