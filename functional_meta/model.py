"""Functional models: an ``nn.Module`` as a pure ``apply(params, buffers, x)``.

``functionalize(module)`` returns ``(apply, params, buffers)``: detached copies of the
module's parameters and buffers as flat dicts ``{name: tensor}`` and a callable that runs a
private copy of the module through ``torch.func.functional_call(..., strict=True)``.

**Inputs.** ``x`` is a tensor (``module(x)``), a tuple or list of inputs (positional,
``module(*x)``) or a dict (keyword, ``module(**x)``), as tasks hold them
(``functional_meta.data.tasks``). The output is whatever ``forward`` returns (a tensor, a
tuple, a dict): the loss decides what it can score.

**Dropout** (and every other layer that is random in training mode) follows the module's
mode when it is functionalized: a module in training mode (PyTorch's default) draws fresh
masks at every forward, in the inner loop and the query forward alike, as ``module(x)``
would; a module in ``.eval()`` mode never drops. :meth:`FunctionalModel.using` gives the
same model in the other mode; the algorithms adapt and predict for evaluation with the
model in evaluation mode, so evaluation is deterministic. Under ``vmap`` over tasks the
library maps with ``randomness="different"``: every task draws its own masks, as a loop
over tasks does (same distribution; not the same numbers). :func:`seeded_randomness`
draws them from a ``torch.Generator`` instead of the global one.

Batch normalisation is rewritten from primitives (``var_mean``, rsqrt, a subtraction and one ``addcmul``)
inside ``vmap``: native ``F.batch_norm`` under ``vmap`` gives wrong second-order gradients in
torch 2.13 (functorch issue 534; the pitfalls in docs/architecture.md), and the native layer writes
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

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from functional_meta.autodiff import under_vmap

__all__ = [
    "FunctionalModel",
    "PrimitiveBatchNorm",
    "batch_norm_statistics",
    "draws_randomness",
    "evaluation_mode",
    "functionalize",
    "model_arguments",
    "seeded_randomness",
]

BatchNormMode = Literal["batch", "running"]
_MODES = ("batch", "running")
# Layers that draw random numbers in training mode (dropout of every kind, RReLU's slopes,
# attention and recurrent dropout).
RANDOM_LAYERS = (
    nn.modules.dropout._DropoutNd,
    nn.RReLU,
    nn.MultiheadAttention,
    nn.RNNBase,
)


def model_arguments(x: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for ``forward``: a tuple or list is positional inputs, a dict
    keyword inputs, anything else (a tensor) the one input."""
    if isinstance(x, tuple | list):
        return tuple(x), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x,), {}


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
                # Outside vmap the fused kernel is exact to every order (docs/architecture.md) and
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
    ``named_buffers()`` names; ``x`` is the input, or a tuple/dict of inputs
    (:func:`model_arguments`). Calling never changes the module, the dicts or ``x``.
    ``training``: whether the module runs in training mode; ``random``: whether it then
    draws random numbers (a dropout layer or another of ``RANDOM_LAYERS`` in training mode).
    """

    def __init__(self, module: nn.Module, batch_norm: BatchNormMode) -> None:
        self.module = module
        self.batch_norm = batch_norm
        self.training = module.training
        self._evaluation: FunctionalModel | None = None  # see evaluation_mode
        self.random = any(
            layer.training and isinstance(layer, RANDOM_LAYERS) for layer in module.modules()
        )
        self.param_names = frozenset(name for name, _ in module.named_parameters())
        self.buffer_names = frozenset(name for name, _ in module.named_buffers())
        self.batch_norm_layers = tuple(
            name for name, layer in module.named_modules() if isinstance(layer, PrimitiveBatchNorm)
        )

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        x: Any,
    ) -> Any:
        args, kwargs = model_arguments(x)
        return functional_call(
            self.module, (dict(params), dict(buffers)), args, kwargs, strict=True
        )

    def with_statistics(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        x: Any,
    ) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
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

    def using(
        self, batch_norm: BatchNormMode | None = None, *, training: bool | None = None
    ) -> FunctionalModel:
        """The same model with its batch norm in another mode (``"batch"`` or ``"running"``)
        and/or in training (``True``: dropout on) or evaluation mode (``False``); ``None``
        keeps a setting. Parameter and buffer names are unchanged, so the same dicts serve
        both."""
        batch_norm = self.batch_norm if batch_norm is None else batch_norm
        if batch_norm not in _MODES:
            raise ValueError(f"using: batch_norm must be one of {_MODES}, got {batch_norm!r}")
        if training is not None and not isinstance(training, bool):
            raise TypeError(f"using: training must be None or a bool, got {training!r}")
        module = copy.deepcopy(self.module)
        if training is not None:
            module.train(training)
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
        return (
            f"FunctionalModel(batch_norm={self.batch_norm!r}, training={self.training}, "
            f"module={self.module!r})"
        )


def functionalize(
    module: nn.Module, *, batch_norm: BatchNormMode = "batch"
) -> tuple[FunctionalModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``module`` into a pure ``apply`` and its state.

    Returns ``(apply, params, buffers)``: ``params`` and ``buffers`` are detached copies
    (``{name: tensor}``, the caller's module is never touched); ``apply(params, buffers, x)``
    runs a deep copy of the module in the mode the module is in (training mode: dropout
    on; ``.eval()``: off; see the module docstring), with every ``BatchNorm*d`` replaced by
    :class:`PrimitiveBatchNorm` in the given ``batch_norm`` mode, which never depends on
    the module's mode. ``x`` may be a tuple or dict of inputs (:func:`model_arguments`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be an nn.Module, got {type(module).__name__}")
    if batch_norm not in _MODES:
        raise ValueError(f"functionalize: batch_norm must be one of {_MODES}, got {batch_norm!r}")
    private = copy.deepcopy(module)
    _replace_batch_norms(private, batch_norm)
    params = {name: p.detach().clone() for name, p in private.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in private.named_buffers()}
    return FunctionalModel(private, batch_norm), params, buffers


def evaluation_mode(model: Any) -> Any:
    """``model`` in evaluation mode (dropout off) when it is a :class:`FunctionalModel` in
    training mode, made once per model and kept (records are built per ``maml_step``
    call); any other callable as it is."""
    if not (isinstance(model, FunctionalModel) and model.training):
        return model
    if model._evaluation is None:
        model._evaluation = model.using(training=False)
    return model._evaluation


def draws_randomness(model: Any) -> bool:
    """Whether ``model`` draws random numbers when it runs (a :class:`FunctionalModel` with
    dropout in training mode). A plain callable counts as deterministic."""
    return isinstance(model, FunctionalModel) and model.random


@contextlib.contextmanager
def seeded_randomness(
    model: Any, generator: torch.Generator | None, device: torch.device | str
) -> Iterator[None]:
    """Run the block with ``model``'s random numbers (dropout masks) drawn from ``generator``.

    When ``model`` draws randomness (:func:`draws_randomness`) and ``generator`` is given,
    one seed is drawn from ``generator`` and the global generator of ``device`` is forked
    and seeded with it for the block, then restored: the same ``generator`` state gives the
    same masks, a checkpointed generator resumes them, and the global state is untouched.
    Otherwise (no generator, a deterministic model) nothing changes: dropout draws from
    the global generator, as ``torch.manual_seed`` sets it, and ``generator`` is not drawn
    from.
    """
    if generator is None or not draws_randomness(model):
        yield
        return
    seed = int(torch.randint(2**62, (), generator=generator))
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[], device_type="cpu"):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    backend = torch.get_device_module(device.type)
    index = backend.current_device() if device.index is None else device.index
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        with backend.device(index):
            backend.manual_seed(seed)
        yield
