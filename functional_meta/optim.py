"""Pure functional optimizers on parameter pytrees, in the optax shape.

An optimizer is a pair of pure functions::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)        # params + updates

Nothing is modified in place: each call returns new tensors. The state is a dict of
tensors (checkpointable with ``torch.save``). Learning rates are numbers or *schedules*,
pure functions ``step -> lr`` of the 0-based update count (:func:`constant`,
:func:`cosine_decay`). The update rules follow ``torch.optim.SGD``/``Adam``/``AdamW``
operation for operation, so they agree with them to float rounding.

Hyperparameters are checked when the optimizer is built (numbers, finite, in range; for a
number ``lr``, ``lr * weight_decay < 1`` so the decay factor ``1 - lr·λ`` stays in
``(0, 1]``), and what a schedule returns is checked at each update (a finite number >= 0,
with ``lr * weight_decay < 1``): a bad value is a ``ValueError`` naming it (and, for a
schedule, the step) before any parameter turns NaN or infinite.

``update`` checks ``opt_state`` against the gradients before using it: the keys its own
``init`` makes, a 0-d integer ``count``, and each moment with the gradients' tree structure
and each leaf's shape (a 0-d moment would otherwise broadcast). State from another
optimizer or made for other parameters is a ``ValueError`` (``TypeError`` for a wrong type)
naming ``opt_state`` and what differs. The check compares Python objects only (no tensor is
read, so no device synchronisation) and reuses the flattened trees the update needs anyway.

**Differentiable.** Every update is out of place, reads no tensor value but its update
``count`` (a CPU tensor: no device synchronisation), and has a finite derivative everywhere,
so the inner loop can differentiate through it (``InnerLoop(optimizer=...)``: second-order
MAML through momentum buffers and Adam's moments). The elementwise arithmetic runs as
``torch._foreach_*`` kernels (one launch per operation over all tensors) when nothing is
differentiated through it and no ``torch.func`` transform is active, else as the same
operators tensor by tensor (foreach operators have no ``vmap`` batching rule); on the CPU
the two agree bit for bit (``tests/test_inner_optimizers.py``).

Users who prefer ``torch.optim`` take the gradients from ``maml_grad`` (and friends) and
hand them over with :func:`assign_grads`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from functional_meta import tree
from functional_meta.autodiff import transforms_active
from functional_meta.optim_checks import check_state, check_state_keys
from functional_meta.validation import (
    check_number_in,
    check_positive_number,
    check_schedule_value,
)

__all__ = [
    "GradientTransformation",
    "adam",
    "adamw",
    "apply_updates",
    "assign_grads",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "sgd",
]

Schedule = Callable[[int], float]
LearningRate = float | Schedule


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``."""

    init: Callable[[Any], dict[str, Any]]
    update: Callable[[Any, dict[str, Any], Any], tuple[Any, dict[str, Any]]]


def constant(value: float) -> Schedule:
    """The schedule ``step -> value``."""
    check_positive_number("constant: value", value)
    return lambda step: value


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine annealing from ``init_value`` to ``alpha * init_value`` over ``decay_steps``
    (Loshchilov and Hutter 2017, no restarts; held at the floor afterwards):
    ``lr(t) = init · (α + (1 − α) · ½(1 + cos(π · min(t, T) / T)))``."""
    check_positive_number("cosine_decay: init_value", init_value)
    if not isinstance(decay_steps, int) or decay_steps < 1:
        raise ValueError(f"cosine_decay: decay_steps must be an integer >= 1, got {decay_steps!r}")
    check_number_in("cosine_decay: alpha", alpha, 0.0, 1.0, include_high=True)

    def schedule(step: int) -> float:
        progress = min(step, decay_steps) / decay_steps
        return init_value * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * progress)))

    return schedule


def _as_schedule(name: str, lr: LearningRate) -> Schedule:
    if callable(lr):
        return lr
    check_positive_number(name, lr)
    return constant(float(lr))


def _check_decay(name: str, lr: LearningRate, weight_decay: float) -> None:
    if not callable(lr) and weight_decay and lr * weight_decay >= 1:
        raise ValueError(
            f"{name}: lr * weight_decay = {lr:g} * {weight_decay:g} must be below 1 (the decay "
            "factor 1 - lr * weight_decay would be <= 0)"
        )


def _rate(name: str, schedule: Schedule, step: int, weight_decay: float) -> float:
    """``schedule(step)``, checked: a finite number >= 0, and ``rate * weight_decay < 1``."""
    rate = check_schedule_value(f"{name}: lr", step, schedule(step))
    if weight_decay and rate * weight_decay >= 1:
        raise ValueError(
            f"{name}: the schedule returned lr {rate:g} at step {step}, making lr * weight_decay "
            f"= {rate:g} * {weight_decay:g} = {rate * weight_decay:g}; it must be below 1 (the "
            "decay factor 1 - lr * weight_decay would be <= 0)"
        )
    return rate


class _Leafwise:
    """Elementwise arithmetic on lists of tensors: ``torch._foreach_*`` when ``fused``, else
    the same operators tensor by tensor (see the module docstring). Operands are lists of
    the same length or, as the second operand, a number."""

    def __init__(self, *lists: list[torch.Tensor]) -> None:
        tracked = torch.is_grad_enabled() and any(t.requires_grad for ts in lists for t in ts)
        self.fused = not tracked and not transforms_active()

    def _binary(self, op: str, xs: list[torch.Tensor], ys: Any, **options: Any) -> list:
        if self.fused:
            return getattr(torch, f"_foreach_{op}")(xs, ys, **options)
        pairs = zip(xs, ys, strict=True) if isinstance(ys, list) else ((x, ys) for x in xs)
        return [getattr(torch, op)(x, y, **options) for x, y in pairs]

    def add(self, xs: list[torch.Tensor], ys: Any, **alpha: float) -> list[torch.Tensor]:
        return self._binary("add", xs, ys, **alpha)

    def sub(self, xs: list[torch.Tensor], ys: Any) -> list[torch.Tensor]:
        return self._binary("sub", xs, ys)

    def mul(self, xs: list[torch.Tensor], ys: Any) -> list[torch.Tensor]:
        return self._binary("mul", xs, ys)

    def div(self, xs: list[torch.Tensor], ys: Any) -> list[torch.Tensor]:
        return self._binary("div", xs, ys)

    def sqrt(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``√x`` for ``x >= 0``. Unfused, its derivative at ``x = 0`` is 0, not ∞ (which
        times the zero that reaches it would be NaN): the values are ``torch.sqrt``'s."""
        if self.fused:
            return torch._foreach_sqrt(xs)
        positive = [x > 0 for x in xs]
        return [
            torch.where(p, torch.sqrt(torch.where(p, x, 1.0)), 0.0)
            for x, p in zip(xs, positive, strict=True)
        ]


def _count(state: Mapping[str, Any]) -> int:
    return int(state["count"])


def _zero_count() -> torch.Tensor:
    """The update count of a fresh state: a 0-d int64 CPU tensor (read without a device sync)."""
    return torch.zeros((), dtype=torch.int64, device="cpu")


def _next_count(state: Mapping[str, Any]) -> torch.Tensor:
    return state["count"] + 1


def sgd(
    lr: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``.
    At update ``t = 1, 2, ...`` with gradient ``g``, elementwise::

        g ← g + λθ                                    (only with weight_decay λ)
        b ← g  at t = 1,  else  μb + (1 − τ)g         (only with momentum μ; dampening τ)
        d = g + μb (nesterov), b (momentum) or g
        update = −lr · d

    Differentiable (``InnerLoop(optimizer=sgd(lr, momentum=0.9))``): the first-step branch
    is on the update count, never on a tensor's value.

    Checked: ``momentum`` in ``[0, 1)`` (unlike ``torch.optim.SGD``, which lets a buffer grow
    without bound), ``dampening`` in ``[0, 1]``, ``weight_decay`` finite and >= 0 with
    ``lr * weight_decay < 1``, and each rate a schedule returns (see the module docstring)."""
    schedule = _as_schedule("sgd: lr", lr)
    momentum = check_number_in("sgd: momentum", momentum, 0.0, 1.0)
    dampening = check_number_in("sgd: dampening", dampening, 0.0, 1.0, include_high=True)
    weight_decay = check_number_in("sgd: weight_decay", weight_decay, 0.0)
    _check_decay("sgd", lr, weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd: nesterov needs momentum > 0 and dampening == 0")

    def init(params: Any) -> dict[str, Any]:
        state: dict[str, Any] = {"count": _zero_count()}
        if momentum:
            state["momentum"] = tree.zeros_like(params)
        return state

    keys = frozenset({"count", "momentum"} if momentum else {"count"})
    moments = ("momentum",) if momentum else ()

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        _, spec, _ = check_state("sgd", state, keys, moments, grads)
        if weight_decay and optree.tree_structure(params) != spec:
            raise ValueError("sgd: the gradients do not have the structure of the params")
        step = _count(state)
        if weight_decay:
            grads = tree.axpy(weight_decay, params, grads)
        new_state: dict[str, Any] = {"count": _next_count(state)}
        direction = grads
        if momentum:
            if step == 0:
                buffer = tree.map(torch.clone, grads)
            else:
                buffer = tree.map(
                    lambda b, g: momentum * b + (1 - dampening) * g, state["momentum"], grads
                )
            new_state["momentum"] = buffer
            direction = tree.axpy(momentum, buffer, grads) if nesterov else buffer
        rate = _rate("sgd", schedule, step, weight_decay)
        return tree.scale(-rate, direction), new_state

    return GradientTransformation(init, update)


def _adam(
    name: str,
    lr: LearningRate,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> GradientTransformation:
    schedule = _as_schedule(f"{name}: lr", lr)
    if not isinstance(betas, tuple | list):
        raise TypeError(
            f"{name}: betas: expected a pair (beta1, beta2), got {type(betas).__name__}"
        )
    if len(betas) != 2:
        raise ValueError(f"{name}: betas: expected a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (check_number_in(f"{name}: betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
    eps = check_number_in(f"{name}: eps", eps, 0.0)
    weight_decay = check_number_in(f"{name}: weight_decay", weight_decay, 0.0)
    _check_decay(name, lr, weight_decay)

    def init(params: Any) -> dict[str, Any]:
        return {
            "count": _zero_count(),
            "mu": tree.zeros_like(params),
            "nu": tree.zeros_like(params),
        }

    keys = frozenset({"count", "mu", "nu"})

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        g, spec, flat = check_state(name, state, keys, ("mu", "nu"), grads)
        p, params_spec = optree.tree_flatten(params)
        if params_spec != spec:
            raise ValueError(f"{name}: the gradients do not have the structure of the params")
        step = _count(state) + 1
        rate = _rate(name, schedule, step - 1, weight_decay)
        ops = _Leafwise(g, flat["mu"], flat["nu"], p if weight_decay else [])
        if weight_decay and not decoupled:
            g = ops.add(ops.mul(p, weight_decay), g)  # λθ + g
        m, v = flat["mu"], flat["nu"]
        m = ops.add(m, ops.sub(g, m), alpha=1 - b1)
        v = ops.add(ops.mul(v, b2), ops.mul(g, g), alpha=1 - b2)
        step_size = rate / (1 - b1**step)
        root_correction = math.sqrt(1 - b2**step)
        denominator = ops.add(ops.div(ops.sqrt(v), root_correction), eps)
        updates = ops.mul(ops.div(m, denominator), -step_size)
        if decoupled and weight_decay:
            updates = ops.add(updates, p, alpha=-rate * weight_decay)
        unflatten = functools.partial(optree.tree_unflatten, spec)
        return unflatten(updates), {
            "count": _next_count(state),
            "mu": unflatten(m),
            "nu": unflatten(v),
        }

    return GradientTransformation(init, update)


def adam(
    lr: LearningRate,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam (Kingma and Ba 2015) as ``torch.optim.Adam`` (``weight_decay`` is L2 on the
    gradient). At update ``t = 1, 2, ...`` with gradient ``g``, elementwise::

        g ← g + λθ                                    (only with weight_decay λ)
        m ← m + (1 − β₁)(g − m)                        (= β₁m + (1 − β₁)g)
        v ← β₂v + (1 − β₂)g²
        update = −lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    from ``m = v = 0``. Differentiable (``InnerLoop(optimizer=adam(...))``): where ``v = 0``
    (every gradient of that entry so far exactly 0), ``√v`` is given derivative 0, the
    subgradient of ``√(g²) = |g|`` at 0, instead of ∞ (which times the zero reaching it
    is NaN in second-order meta-gradients); its values are unchanged. Near ``g = 0`` the
    update behaves like ``−lr · sign(g)``, so its derivative there is of order ``lr/ε``.

    Checked: ``betas`` a pair in ``[0, 1)``, ``eps`` and ``weight_decay`` finite and >= 0,
    ``lr * weight_decay < 1`` (a sanity bound here, where the decay goes through the
    normalised gradient), and each rate a schedule returns (see the module docstring)."""
    return _adam("adam", lr, betas, eps, weight_decay, decoupled=False)


def adamw(
    lr: LearningRate,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """AdamW (Loshchilov and Hutter 2019) as ``torch.optim.AdamW``: :func:`adam`'s update
    (without the L2 term) plus the decoupled decay ``−lr · λ · θ``. Checked as :func:`adam`; ``lr * weight_decay < 1`` keeps
    the decay factor ``1 − lr · λ`` in ``(0, 1]``."""
    return _adam("adamw", lr, betas, eps, weight_decay, decoupled=True)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the gradients by ``min(1, max_norm / (‖g‖ + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_``. Stateless (``opt_state`` must be ``{}``); put it first
    in a :func:`chain`."""
    check_positive_number("clip_by_global_norm: max_norm", max_norm)

    def init(params: Any) -> dict[str, Any]:
        return {}

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        if not isinstance(state, Mapping) or state:
            got = f"keys {sorted(state)}" if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"clip_by_global_norm: opt_state: expected {{}} (it keeps no state), got {got}"
            )
        factor = torch.clamp(max_norm / (tree.global_norm(grads) + 1e-6), max=1.0)
        return tree.scale(factor, grads), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order, each to the previous one's output
    (e.g. ``chain(clip_by_global_norm(10.0), adam(1e-3))``). Its ``opt_state`` must have one
    entry per transformation, ``"0"``, ``"1"``, ..., each checked by that transformation."""
    if not transforms:
        raise ValueError("chain: expected at least one transformation")

    def init(params: Any) -> dict[str, Any]:
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    keys = frozenset(str(i) for i in range(len(transforms)))

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        check_state_keys("chain", state, keys, "one state per transformation")
        new_state = {}
        for i, t in enumerate(transforms):
            grads, new_state[str(i)] = t.update(grads, state[str(i)], params=params)
        return grads, new_state

    return GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf (new tensors; ``params`` is not modified)."""
    leaves, spec = optree.tree_flatten(params)
    if optree.tree_structure(updates) != spec:
        raise ValueError("apply_updates: the updates do not have the structure of the params")
    increments = optree.tree_leaves(updates)
    return optree.tree_unflatten(spec, _Leafwise(leaves, increments).add(leaves, increments))


def assign_grads(parameters: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> None:
    """Set ``parameters[name].grad = grads[name]`` so a ``torch.optim`` optimizer can step.

    The one deliberately impure helper here: it exists for users who keep ``torch.optim``.
    """
    missing = sorted(parameters.keys() - grads.keys())
    if missing:
        raise KeyError(f"assign_grads: no gradient for parameters {missing}")
    for name, parameter in parameters.items():
        parameter.grad = grads[name].detach().to(parameter.dtype).clone()
