"""autodiff.grad_and_value: torch.autograd outside transforms equals torch.func inside."""

import torch
from torch.func import grad, grad_and_value, vmap

from functional_meta.autodiff import grad_and_value as engine_grad_and_value
from functional_meta.autodiff import transforms_active

F64 = torch.float64


def loss(p):
    value = (p["w"] ** 3).sum() * p["b"]
    return value, {"seen": value.detach() * 2}


def params():
    return {"w": torch.tensor([0.5, -1.5, 2.0], dtype=F64), "b": torch.tensor(0.7, dtype=F64),
            "unused": torch.ones(2, dtype=F64)}  # fmt: skip


def test_outside_transforms_it_equals_torch_func_and_leaves_no_graph():
    assert not transforms_active()
    got, (value, aux) = engine_grad_and_value(loss, params())
    want, (want_value, want_aux) = grad_and_value(loss, has_aux=True)(params())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        assert not got[name].requires_grad
    assert torch.equal(got["unused"], torch.zeros(2, dtype=F64))
    assert not value.requires_grad and torch.equal(value, want_value)
    torch.testing.assert_close(aux["seen"], want_aux["seen"])
    with torch.no_grad():  # like torch.func, it differentiates under no_grad too
        under_no_grad, _ = engine_grad_and_value(loss, params())
    torch.testing.assert_close(under_no_grad["w"], want["w"])


def test_create_graph_gives_the_second_derivative_of_torch_func():
    def inner_norm(p):  # the squared norm of the inner gradient, differentiated again
        g, _ = engine_grad_and_value(loss, p, create_graph=True)
        return g["w"].pow(2).sum() + g["b"] ** 2

    leaves = {k: v.clone().requires_grad_() for k, v in params().items()}
    value = inner_norm(leaves)
    got = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)

    def reference(p):
        g = grad(lambda q: loss(q)[0])(p)
        return g["w"].pow(2).sum() + g["b"] ** 2

    want = grad(reference)(params())
    for (name, _), g in zip(leaves.items(), got, strict=True):
        expected = want[name]
        torch.testing.assert_close(torch.zeros_like(expected) if g is None else g, expected)


def test_inside_a_transform_it_is_torch_func():
    seen = []

    def per_example(p, scale):
        seen.append(transforms_active())
        g, _ = engine_grad_and_value(lambda q: ((q["w"] * scale).sum() ** 2, {}), p)
        return g["w"]

    out = vmap(per_example, in_dims=(None, 0))({"w": torch.ones(3)}, torch.arange(2.0))
    assert seen == [True] and out.shape == (2, 3)
    torch.testing.assert_close(out[1], torch.full((3,), 6.0))
