"""iMAML: the implicit meta-gradient against the closed form of ridge regression, conjugate
gradient against a dense solve, the approach to unrolled MAML on a nonlinear model, the
batching strategies against each other, memory that does not grow with inner steps, and
its settings' errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import functional_meta as fm
from functional_meta.algorithms.imaml import conjugate_gradient, hvp
from tests.reference import image_tasks, regression_tasks, tiny_conv4, tiny_mlp

STRATEGIES = [fm.Batching("vmap"), fm.Batching("vmap", chunk_size=2), fm.Batching("loop")]


def flat(tree):
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def relative_error(got, expected):
    return ((flat(got) - flat(expected)).norm() / flat(expected).norm()).item()


def ridge_tasks(num_tasks=3, dim=3, support=8, query=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        x = torch.randn(num_tasks, n, dim, generator=g, dtype=torch.float64)
        w = torch.randn(num_tasks, dim, 1, generator=g, dtype=torch.float64)
        return x, x @ w + 0.1 * torch.randn(num_tasks, n, 1, generator=g, dtype=torch.float64)

    return fm.TaskBatch(*draw(support), *draw(query))


@pytest.mark.parametrize(("damping", "hessian_damping"), [(0.0, 0.0), (0.5, 0.0), (1.0, 10.0)])
@pytest.mark.parametrize("batching", STRATEGIES, ids=["vmap", "chunked", "loop"])
def test_ridge_regression_meta_gradient_equals_the_closed_form(batching, damping, hessian_damping):
    # Linear model φ ↦ X φ with L(φ) = (1/n)‖X φ − y‖² (F.mse_loss): H = (2/n) XᵀX, and the
    # proximal optimum is φ*(θ) = ((2/n) XᵀX + λI)⁻¹ ((2/n) Xᵀy + λθ), exact in closed form.
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(nn.Linear(3, 1, bias=False).double())
    tasks, lam = ridge_tasks(), 1.5
    algorithm = fm.algorithms.imaml(
        apply, F.mse_loss, fm.InnerLoop(lr=0.2, steps=300), batching=batching,
        regularization=lam, cg_steps=3, damping=damping, hessian_damping=hessian_damping,
    )  # fmt: skip
    gradient = algorithm.grad(*algorithm.init(params, buffers), tasks)

    theta = params["weight"].reshape(3, 1).clone().requires_grad_()
    total, expected = 0.0, torch.zeros(3, 1, dtype=torch.float64)
    for i in range(len(tasks)):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        hessian = 2 / len(xs) * xs.T @ xs
        optimum = torch.linalg.solve(hessian + lam * torch.eye(3, dtype=torch.float64),
                                     2 / len(xs) * xs.T @ ys + lam * theta)  # fmt: skip
        query_loss = F.mse_loss(xq @ optimum, yq)
        total = total + query_loss / len(tasks)
        query_grad = 2 / len(xq) * xq.T @ (xq @ optimum.detach() - yq)
        system = (1 + damping) * torch.eye(3, dtype=torch.float64) + hessian / (
            lam + hessian_damping
        )
        expected += torch.linalg.solve(system, query_grad) / len(tasks)
    (closed_form,) = torch.autograd.grad(total, theta)
    got = gradient.grads["params"]["weight"].reshape(3, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    if damping == hessian_damping == 0.0:  # the exact derivative of L_query(φ*(θ))
        torch.testing.assert_close(got, closed_form, rtol=1e-12, atol=1e-14)
    assert gradient.metrics["loss"] == pytest.approx(total.item(), rel=1e-12)
    assert gradient.metrics["cg_residual"] < 1e-6


def test_conjugate_gradient_equals_a_dense_solve_and_hvp_the_dense_hessian():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = {k: v.detach() for k, v in module.named_parameters()}
    x, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    names, shapes = sorted(params), [params[k].shape for k in sorted(params)]

    def unflatten(vector):
        pieces = torch.split(vector, [math.prod(s) for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}

    def loss(p):
        return F.mse_loss(functional_call(module, p, (x,)), y)

    hessian = torch.autograd.functional.hessian(lambda v: loss(unflatten(v)), flat(params))
    size = hessian.shape[0]
    vector = torch.randn(size, dtype=torch.float64)
    torch.testing.assert_close(flat(hvp(loss, params, unflatten(vector))), hessian @ vector,
                               rtol=1e-12, atol=1e-12)  # fmt: skip

    lam = 2 * max(1.0, -torch.linalg.eigvalsh(hessian).min().item())  # I + H/λ positive definite
    system = torch.eye(size, dtype=torch.float64) + hessian / lam
    solution, residual = conjugate_gradient(
        lambda v: fm.tree.axpy(1 / lam, hvp(loss, params, v), v), unflatten(vector), 3 * size
    )
    torch.testing.assert_close(flat(solution), torch.linalg.solve(system, vector),
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    assert residual < 1e-10


def test_conjugate_gradient_stops_at_negative_curvature():
    """Truncated CG (Steihaug): a direction of non-positive curvature stops the iterate; at
    the first direction the answer is b itself (the first-order meta-gradient)."""
    matrix = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))

    def matvec(v):
        return {"w": matrix @ v["w"]}

    b = {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}  # pure negative curvature
    solution, _ = conjugate_gradient(matvec, b, 3)
    torch.testing.assert_close(solution["w"], b["w"])
    b = {"w": torch.tensor([1.0, 0.1], dtype=torch.float64)}  # first direction curves up
    solution, _ = conjugate_gradient(matvec, b, 3)
    one_step, _ = conjugate_gradient(matvec, b, 1)
    torch.testing.assert_close(solution["w"], one_step["w"])  # the second direction stopped it
    assert bool(torch.isfinite(solution["w"]).all())
    batched = torch.func.vmap(lambda w: conjugate_gradient(matvec, {"w": w}, 3)[0]["w"])
    torch.testing.assert_close(
        batched(torch.stack([b["w"], torch.tensor([0.0, 1.0], dtype=torch.float64)])),
        torch.stack([one_step["w"], torch.tensor([0.0, 1.0], dtype=torch.float64)]),
    )


def test_conjugate_gradient_answers_its_smallest_residual_on_an_indefinite_system():
    """On an indefinite ``A`` every CG direction can curve up while the residual grows:
    here plain (Steihaug-truncated) CG ends at ``‖b − A x‖ = 3.2 ‖b‖`` with ``‖x‖ = 3.8 ‖b‖``.
    The answer is the candidate with the smallest residual (here the first iterate), never
    worse than the first-order answer ``x = b``, and the residual returned is its own."""
    matrix = torch.diag(torch.tensor([3.0, 1.0, -0.6], dtype=torch.float64))

    def matvec(v):
        return {"w": matrix @ v["w"]}

    b = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)

    def relative_residual(x):
        return (b - matrix @ x).norm() / b.norm()

    solution, residual = conjugate_gradient(matvec, {"w": b}, 3)
    first_iterate = (b @ b) / (b @ matrix @ b) * b
    torch.testing.assert_close(solution["w"], first_iterate)
    torch.testing.assert_close(residual, relative_residual(solution["w"]))
    assert residual < relative_residual(b) < 1.1
    batched = torch.func.vmap(lambda w: conjugate_gradient(matvec, {"w": w}, 3)[0]["w"])
    torch.testing.assert_close(batched(b[None])[0], first_iterate)


def test_conjugate_gradient_stays_finite_after_an_exact_solve():
    # A 1-dimensional system is solved in one step; later steps must not divide 0 by 0.
    b = {"w": torch.tensor([3.0], dtype=torch.float64)}
    solution, residual = conjugate_gradient(lambda v: fm.tree.scale(2.0, v), b, 5)
    assert solution["w"].item() == 1.5 and residual.item() == 0.0


def unrolled_proximal_maml(module, params, tasks, lam, lr, steps):
    """Second-order MAML through ``steps`` gradient steps on L_support(φ) + λ/2‖φ − θ‖²,
    by torch.autograd, one task at a time (θ in both the start point and the proximal term)."""
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for i in range(len(tasks)):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        phi = dict(theta)
        for _ in range(steps):
            proximal = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
            inner = F.mse_loss(functional_call(module, phi, (xs,)), ys) + lam / 2 * proximal
            grads = torch.autograd.grad(inner, list(phi.values()), create_graph=True)
            phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads, strict=True)}
        total = total + F.mse_loss(functional_call(module, phi, (xq,)), yq) / len(tasks)
    return dict(zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True))


def test_nonlinear_meta_gradient_approaches_unrolled_maml_as_steps_grow():
    module = tiny_mlp(torch.float64)
    apply, params, buffers = fm.functionalize(module)
    tasks, lam, lr = regression_tasks(num_tasks=2, dtype=torch.float64), 2.0, 0.05
    errors = []
    for steps, cg_steps in [(5, 1), (20, 3), (80, 10), (300, 30)]:
        algorithm = fm.algorithms.imaml(apply, F.mse_loss, fm.InnerLoop(lr=lr, steps=steps),
                                        regularization=lam, cg_steps=cg_steps)  # fmt: skip
        got = algorithm.grad(*algorithm.init(params, buffers), tasks).grads["params"]
        expected = unrolled_proximal_maml(module.train(), params, tasks, lam, lr, steps)
        errors.append(relative_error(got, expected))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-3, errors


@pytest.mark.parametrize("case", ["mlp", "conv4"])
def test_every_batching_strategy_gives_the_same_meta_gradient(case):
    if case == "mlp":
        model, loss, tasks = (
            tiny_mlp(torch.float64),
            F.mse_loss,
            regression_tasks(dtype=torch.float64),
        )
    else:
        model, loss, tasks = (
            tiny_conv4(dtype=torch.float64),
            F.cross_entropy,
            image_tasks(dtype=torch.float64),
        )
    apply, params, buffers = fm.functionalize(model)
    results = []
    for batching in STRATEGIES:
        algorithm = fm.algorithms.imaml(apply, loss, fm.InnerLoop(lr=0.05, steps=4),
                                        batching=batching, regularization=10.0, cg_steps=4)  # fmt: skip
        results.append(algorithm.grad(*algorithm.init(params, buffers), tasks))
    # The solve amplifies rounding differences (conv4: fused batch norm in the loop,
    # primitives under vmap) by the condition of I + H/λ; float64 keeps them far below 1e-9.
    for other in results[1:]:
        fm.tree.map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10),
                    results[0].grads, other.grads)  # fmt: skip
        assert other.metrics["loss"] == pytest.approx(results[0].metrics["loss"], rel=1e-10)
        assert other.metrics["support_losses"] == pytest.approx(
            results[0].metrics["support_losses"]
        )


def saved_bytes_alive_at_most(run):
    """The largest total size of tensors saved for backward that are alive at once while
    ``run()`` executes (tracked with saved_tensors_hooks and weak references)."""
    import weakref

    alive, peak = {}, [0]

    def pack(tensor):
        key = id(tensor)
        alive[key] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, alive.pop, key, None)
        peak[0] = max(peak[0], sum(alive.values()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return peak[0]


def test_memory_held_for_the_outer_gradient_does_not_grow_with_inner_steps():
    apply, params, buffers = fm.functionalize(tiny_mlp())
    tasks = regression_tasks()

    def peak(name, steps):
        inner = fm.InnerLoop(lr=0.02, steps=steps)
        algorithm = fm.algorithms.build(
            name, apply, F.mse_loss, inner, batching=fm.Batching("loop")
        )
        return saved_bytes_alive_at_most(
            lambda: algorithm.grad(*algorithm.init(params, buffers), tasks)
        )

    assert peak("imaml", 20) == peak("imaml", 2)
    assert peak("maml", 20) > 5 * peak("maml", 2)


def test_adapt_runs_the_proximal_inner_loop_and_evaluation_scores_it():
    module = tiny_mlp(torch.float64)
    apply, params, buffers = fm.functionalize(module)
    lam, lr = 0.7, 0.03
    algorithm = fm.algorithms.imaml(apply, F.mse_loss, fm.InnerLoop(lr=lr, steps=3),
                                    regularization=lam)  # fmt: skip
    state = fm.init_state(algorithm, params, buffers, fm.optim.adam(1e-3))
    tasks = regression_tasks(dtype=torch.float64)
    xs, ys = tasks.support_x[0], tasks.support_y[0]
    phi = {k: v.clone() for k, v in params.items()}
    for _ in range(3):  # φ ← φ − α (∇L_support(φ) + λ (φ − θ))
        leaves = {k: v.requires_grad_() for k, v in phi.items()}
        grads = torch.autograd.grad(F.mse_loss(functional_call(module, leaves, (xs,)), ys),
                                    list(leaves.values()))  # fmt: skip
        phi = {k: (p - lr * (g + lam * (p - params[k]))).detach()
               for (k, p), g in zip(leaves.items(), grads, strict=True)}  # fmt: skip
    adapted = algorithm.adapt(state.meta_params, buffers, xs, ys)
    assert adapted.stage == 3
    fm.tree.map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14),
                adapted.params, phi)  # fmt: skip
    unadapted = algorithm.adapt(state.meta_params, buffers, xs, ys, 0)
    assert all(unadapted.params[k] is state.meta_params["params"][k] for k in params)
    result = fm.evaluate(algorithm, state, tasks)
    query = F.mse_loss(algorithm.predict(adapted, tasks.query_x[0]), tasks.query_y[0])
    assert result.steps == 3 and result.losses[0].item() == pytest.approx(query.item(), rel=1e-6)


def test_training_lowers_the_post_adaptation_loss():
    torch.manual_seed(0)
    apply, params, buffers = fm.functionalize(fm.models.mlp((1, 40, 40, 1)))
    algorithm = fm.algorithms.imaml(apply, F.mse_loss, fm.InnerLoop(lr=0.02, steps=5),
                                    regularization=0.5, cg_steps=3)  # fmt: skip
    optimizer = fm.optim.adam(3e-3)
    state = fm.init_state(algorithm, params, buffers, optimizer)
    test = fm.sinusoid_test_tasks(100)
    before = fm.evaluate(algorithm, state, test).loss
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        state, _ = fm.step(
            algorithm, state, fm.data.sinusoid_tasks(10, generator=generator), optimizer
        )
    assert fm.evaluate(algorithm, state, test).loss < 0.7 * before


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(regularization=0.0), "regularization: expected a positive finite number"),
        (dict(regularization=math.inf), "regularization: expected a positive finite number"),
        (dict(cg_steps=0), "cg_steps: expected an integer >= 1"),
        (dict(cg_steps=2.5), "cg_steps: expected an integer >= 1"),
        (dict(damping=-0.1), "damping: expected a finite number >= 0"),
        (dict(hessian_damping=-1.0), "hessian_damping: expected a finite number >= 0"),
        (dict(hessian_damping=math.nan), "hessian_damping: expected a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused_when_built(given, message):
    apply, _, _ = fm.functionalize(tiny_mlp())
    with pytest.raises(ValueError, match=message):
        fm.algorithms.imaml(apply, F.mse_loss, **given)


def test_a_partial_inner_loop_is_refused():
    apply, _, _ = fm.functionalize(tiny_mlp())
    inner = fm.InnerLoop(adapted=lambda name: name.startswith("head."))
    with pytest.raises(ValueError, match="inner.adapted: iMAML adapts every parameter"):
        fm.algorithms.imaml(apply, F.mse_loss, inner)
