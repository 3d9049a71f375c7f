"""Functional models: an ``nn.Module`` as a pure ``apply(params, buffers, x)``.

``functionalize(module)`` returns ``(apply, params, buffers)``: detached copies of the
module's parameters and buffers as flat dicts ``{name: tensor}`` and a callable that runs a
private copy of the module through ``torch.func.functional_call(..., strict=True)``.

Batch normalisation is rewritten from primitives (``var_mean``, rsqrt, a subtraction and one ``addcmul``)
inside ``vmap``: native ``F.batch_norm`` under ``vmap`` gives wrong second-order gradients in
torch 2.13 (see the pitfalls in DESIGN.md, functorch issue 534), and the native layer writes
its running statistics in place, which a pure function must not do. Outside ``vmap`` (the
``"loop"`` strategy, plain calls) batch statistics use the fused ``F.batch_norm`` kernel with
no running buffers: exact to every order there, and several times cheaper than the
primitives on conv nets (docs/performance.md). Which statistics normalise is an
explicit argument, never the module's train/eval state:

- ``batch_norm="batch"`` (default, the MAML paper's protocol): every forward normalises with
  the statistics of the batch it is given — the support set during adaptation, the query
  set when scoring. Running buffers are carried but never read or written.
- ``batch_norm="running"``: normalise with the ``running_mean``/``running_var`` buffers, as
  ``module.eval()`` would (used with per-step statistics in MAML++, see ``mamlpp``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from functional_meta.autodiff import under_vmap

__all__ = ["FunctionalModel", "PrimitiveBatchNorm", "batch_norm_statistics", "functionalize"]

BatchNormMode = Literal["batch", "running"]
_MODES = ("batch", "running")


def batch_norm_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x [N, C, *spatial]``, each ``[C]``."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims)
    centred = x - _channel_view(mean, x)
    return mean, (centred * centred).mean(dim=dims)


def _running_update_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and *unbiased* variance of ``x [N, C, *spatial]``, as ``nn.BatchNorm`` feeds its
    running averages, detached."""
    mean, var = batch_norm_statistics(x.detach())
    count = x.numel() // x.shape[1]
    return mean, var * (count / max(count - 1, 1))


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v [C]`` shaped ``[1, C, 1, ...]`` to broadcast against ``x [N, C, *spatial]``."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


class PrimitiveBatchNorm(nn.Module):
    """Batch normalisation from primitives, safe for second-order gradients under ``vmap``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` over ``x [N, C, *spatial]``, with
    ``mean``/``var`` the batch's (mode ``"batch"``) or the running buffers (mode ``"running"``).
    It keeps the parameter and buffer names of ``nn.BatchNorm*d`` so a functionalized model's
    state dict is unchanged, and never writes to its buffers.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, mode: BatchNormMode) -> None:
        super().__init__()
        self.eps = source.eps
        self.mode = mode
        self.num_features = source.num_features
        if source.affine:
            self.weight = nn.Parameter(source.weight.detach().clone())
            self.bias = nn.Parameter(source.bias.detach().clone())
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(source, name, None)
            self.register_buffer(name, None if value is None else value.detach().clone())
        if mode == "running" and self.running_mean is None:
            raise ValueError(
                "functionalize: batch_norm='running' needs running statistics, but a "
                "BatchNorm layer was built with track_running_stats=False"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"PrimitiveBatchNorm: expected input [N, {self.num_features}, ...], got {tuple(x.shape)}"
            )
        if self.mode == "batch":
            if x.numel() == x.shape[1]:  # as nn.BatchNorm: one value per channel has no spread
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{tuple(x.shape)} (batch norm on batch statistics needs more than one "
                    "example per set)"
                )
            if not under_vmap():
                # Outside vmap the fused kernel is exact to every order (see DESIGN.md) and
                # several times cheaper than the primitives' full-size elementwise ops.
                return F.batch_norm(
                    x, None, None, self.weight, self.bias, training=True, eps=self.eps
                )
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        else:
            mean, var = self.running_mean, self.running_var
        # y = (x - mean) * scale + bias with per-channel scale = weight / sqrt(var + eps):
        # two full-size ops (sub, addcmul) instead of four. Centring first keeps float32
        # rounding as in the textbook form (x * scale + (bias - mean * scale) would cancel).
        scale = torch.rsqrt(var + self.eps)
        centred = x - _channel_view(mean, x)
        if self.weight is None:
            return centred * _channel_view(scale, x)
        scale = scale * self.weight
        return torch.addcmul(_channel_view(self.bias, x), centred, _channel_view(scale, x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, mode={self.mode!r}"


def _replace_batch_norms(module: nn.Module, mode: BatchNormMode) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, PrimitiveBatchNorm(child, mode))
        else:
            _replace_batch_norms(child, mode)


class FunctionalModel:
    """A pure callable ``apply(params, buffers, x) -> output`` over a private module copy.

    ``params`` and ``buffers`` are flat dicts keyed by the module's ``named_parameters()`` and
    ``named_buffers()`` names. Calling never changes the module, the dicts or ``x``.
    """

    def __init__(self, module: nn.Module, batch_norm: BatchNormMode) -> None:
        self.module = module
        self.batch_norm = batch_norm
        self.param_names = frozenset(name for name, _ in module.named_parameters())
        self.buffer_names = frozenset(name for name, _ in module.named_buffers())
        self.batch_norm_layers = tuple(
            name for name, layer in module.named_modules() if isinstance(layer, PrimitiveBatchNorm)
        )

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        x: torch.Tensor,
    ) -> torch.Tensor:
        return functional_call(self.module, (dict(params), dict(buffers)), (x,), strict=True)

    def with_statistics(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``(apply(params, buffers, x), statistics)`` from one forward pass.

        ``statistics`` is ``{layer_name: (mean [C], unbiased_var [C])}``: what each batch-norm
        layer's input had, detached (no buffer is written; safe under ``vmap``).
        """
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [
            self.module.get_submodule(name).register_forward_pre_hook(
                lambda _, inputs, name=name: seen.__setitem__(
                    name, _running_update_statistics(inputs[0])
                )
            )
            for name in self.batch_norm_layers
        ]
        try:
            output = self(params, buffers, x)
        finally:
            for handle in handles:
                handle.remove()
        return output, seen

    def using(self, batch_norm: BatchNormMode) -> FunctionalModel:
        """The same model with its batch norm in another mode (``"batch"`` or ``"running"``);
        parameter and buffer names are unchanged, so the same dicts serve both."""
        if batch_norm not in _MODES:
            raise ValueError(f"using: batch_norm must be one of {_MODES}, got {batch_norm!r}")
        module = copy.deepcopy(self.module)
        for name in self.batch_norm_layers:
            layer = module.get_submodule(name)
            if batch_norm == "running" and layer.running_mean is None:
                raise ValueError("using: batch_norm='running' needs layers with running statistics")
            layer.mode = batch_norm
        return FunctionalModel(module, batch_norm)

    def check(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
    ) -> None:
        """Raise ``KeyError`` naming missing and unexpected keys when the dicts do not fit."""
        for label, given, expected in (
            ("params", params, self.param_names),
            ("buffers", buffers, self.buffer_names),
        ):
            if not isinstance(given, Mapping):
                raise TypeError(f"{label}: expected a dict of tensors, got {type(given).__name__}")
            missing, unexpected = sorted(expected - given.keys()), sorted(given.keys() - expected)
            if missing or unexpected:
                raise KeyError(
                    f"{label} do not match the model: missing {missing}, unexpected {unexpected}"
                )

    def __repr__(self) -> str:
        return f"FunctionalModel(batch_norm={self.batch_norm!r}, module={self.module!r})"


def functionalize(
    module: nn.Module, *, batch_norm: BatchNormMode = "batch"
) -> tuple[FunctionalModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``module`` into a pure ``apply`` and its state.

    Returns ``(apply, params, buffers)``: ``params`` and ``buffers`` are detached copies
    (``{name: tensor}``, the caller's module is never touched); ``apply(params, buffers, x)``
    runs a deep copy of the module in eval mode (dropout off) with every ``BatchNorm*d``
    replaced by :class:`PrimitiveBatchNorm` in the given ``batch_norm`` mode (see the module
    docstring).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be an nn.Module, got {type(module).__name__}")
    if batch_norm not in _MODES:
        raise ValueError(f"functionalize: batch_norm must be one of {_MODES}, got {batch_norm!r}")
    private = copy.deepcopy(module)
    _replace_batch_norms(private, batch_norm)
    private.eval()
    params = {name: p.detach().clone() for name, p in private.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in private.named_buffers()}
    return FunctionalModel(private, batch_norm), params, buffers
