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


def _path(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _check_keys(name: str, state: Any, keys: frozenset[str], what: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{name}: opt_state: expected the dict made by {name}'s init, got {type(state).__name__}"
        )
    if state.keys() != keys:
        raise ValueError(
            f"{name}: opt_state has keys {sorted(state)}, expected {sorted(keys)} ({what}): "
            f"it was not made by this optimizer's init (another optimizer's state?)"
        )


def _check_state(
    name: str, state: Any, keys: frozenset[str], moments: tuple[str, ...], grads: Any
) -> tuple[list[torch.Tensor], Any, dict[str, list[torch.Tensor]]]:
    """``state`` must be what ``init`` made for parameters shaped like ``grads``: exactly
    ``keys``, a 0-d integer ``count``, and each tree in ``moments`` with the gradients'
    structure and, leaf by leaf, the gradient's shape (a 0-d moment would broadcast silently).
    Python-level comparisons only (no tensor is read). Returns the gradients' leaves and
    treespec and each moment's leaves, so that the update need not flatten them again."""
    _check_keys(name, state, keys, "the update count and the moments")
    count = state["count"]
    if not (
        (isinstance(count, int) and not isinstance(count, bool))
        or (
            isinstance(count, torch.Tensor)
            and count.dim() == 0
            and not (count.is_floating_point() or count.is_complex() or count.dtype == torch.bool)
        )
    ):
        shown = tuple(count.shape) if isinstance(count, torch.Tensor) else type(count).__name__
        raise ValueError(f"{name}: opt_state['count']: expected a 0-d integer tensor, got {shown}")
    leaves, spec = optree.tree_flatten(grads)
    shapes = [g.shape for g in leaves]
    flat = {}
    for key in moments:
        moment, moment_spec = optree.tree_flatten(state[key])
        flat[key] = moment
        if moment_spec != spec:
            expected = {_path(p) for p in optree.tree_paths(grads)}
            found = {_path(p) for p in optree.tree_paths(state[key])}
            differences = [
                f"{label} {', '.join(sorted(paths))}"
                for label, paths in (("lacks", expected - found), ("has extra", found - expected))
                if paths
            ] or ["has the same entries in other containers"]
            raise ValueError(
                f"{name}: opt_state[{key!r}] does not have the gradients' structure: it "
                f"{' and '.join(differences)} (state made for other parameters?)"
            )
        try:  # the fast path: one list comparison
            if [m.shape for m in moment] == shapes:
                continue
        except AttributeError:
            pass
        for index, (m, g) in enumerate(zip(moment, leaves, strict=True)):
            if isinstance(m, torch.Tensor) and m.shape == g.shape:
                continue
            where = f"opt_state[{key!r}]{_path(optree.tree_paths(grads)[index])}"
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{name}: {where}: expected a tensor, got {type(m).__name__}")
            raise ValueError(
                f"{name}: {where} has shape {tuple(m.shape)}; the gradient's is "
                f"{tuple(g.shape)} (state made for other parameters?)"
            )
    return leaves, spec, flat


def _count(state: Mapping[str, Any]) -> int:
    return int(state["count"])


def _next_count(state: Mapping[str, Any]) -> torch.Tensor:
    return state["count"] + 1


def sgd(
    lr: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``:
    ``g ← g + λθ``; ``b ← μb + (1 − τ)g`` (``b = g`` on the first step); ``d = g + μb``
    (Nesterov) or ``b``; update ``−lr · d``.

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
        state: dict[str, Any] = {"count": torch.zeros((), dtype=torch.int64)}
        if momentum:
            state["momentum"] = tree.zeros_like(params)
        return state

    keys = frozenset({"count", "momentum"} if momentum else {"count"})
    moments = ("momentum",) if momentum else ()

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        _, spec, _ = _check_state("sgd", state, keys, moments, grads)
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
            "count": torch.zeros((), dtype=torch.int64),
            "mu": tree.zeros_like(params),
            "nu": tree.zeros_like(params),
        }

    keys = frozenset({"count", "mu", "nu"})

    def update(grads: Any, state: dict[str, Any], params: Any) -> tuple[Any, dict[str, Any]]:
        g, spec, flat = _check_state(name, state, keys, ("mu", "nu"), grads)
        p, params_spec = optree.tree_flatten(params)
        if params_spec != spec:
            raise ValueError(f"{name}: the gradients do not have the structure of the params")
        step = _count(state) + 1
        rate = _rate(name, schedule, step - 1, weight_decay)
        # One fused (foreach) kernel launch per operation over all tensors, not one per tensor:
        # the update of a small model is otherwise dominated by per-operator overhead.
        if weight_decay and not decoupled:
            g = torch._foreach_add(torch._foreach_mul(p, weight_decay), g)  # λθ + g, as before
        m, v = flat["mu"], flat["nu"]
        m = torch._foreach_add(m, torch._foreach_sub(g, m), alpha=1 - b1)
        v = torch._foreach_add(torch._foreach_mul(v, b2), torch._foreach_mul(g, g), alpha=1 - b2)
        step_size = rate / (1 - b1**step)
        root_correction = math.sqrt(1 - b2**step)
        denominator = torch._foreach_add(
            torch._foreach_div(torch._foreach_sqrt(v), root_correction), eps
        )
        updates = torch._foreach_mul(torch._foreach_div(m, denominator), -step_size)
        if decoupled and weight_decay:
            updates = torch._foreach_add(updates, p, alpha=-rate * weight_decay)
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
    gradient): ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    update ``−lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``.

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
    """AdamW (Loshchilov and Hutter 2019) as ``torch.optim.AdamW``: Adam's update plus the
    decoupled decay ``−lr · λ · θ``. Checked as :func:`adam`; ``lr * weight_decay < 1`` keeps
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
        _check_keys("chain", state, keys, "one state per transformation")
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
    return optree.tree_unflatten(spec, torch._foreach_add(leaves, optree.tree_leaves(updates)))


def assign_grads(parameters: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> None:
    """Set ``parameters[name].grad = grads[name]`` so a ``torch.optim`` optimizer can step.

    The one deliberately impure helper here: it exists for users who keep ``torch.optim``.
    """
    missing = sorted(parameters.keys() - grads.keys())
    if missing:
        raise KeyError(f"assign_grads: no gradient for parameters {missing}")
    for name, parameter in parameters.items():
        parameter.grad = grads[name].detach().to(parameter.dtype).clone()
