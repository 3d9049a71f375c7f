"""A trained (or adapted) model back in PyTorch: an ``nn.Module`` that reproduces the
library's predictions.

:func:`to_module` loads parameters and buffers into a copy of the original module. Two
things need a decision there, and both are explicit arguments:

- **Per-stage tensors** (MAML++'s per-step batch-norm weights and statistics) carry a
  leading stage axis the module does not have; ``stage`` chooses the slice (the forward
  after ``stage`` inner steps uses slice ``stage``, the last one beyond it). A tensor is
  per-stage when it has one axis more than the module's own tensor of that name.
- **Batch normalisation.** The library normalises with the statistics of the batch it is
  given (the MAML paper's protocol: transductive over a task's query set), while a
  PyTorch module in ``.eval()`` normalises with its running statistics.
  ``batch_norm="batch"`` (default) keeps the library's behaviour: the exported batch-norm
  layers use batch statistics in ``.eval()`` too (``track_running_stats=False``), so the
  module reproduces the library's predictions on the same batches. ``batch_norm=x`` (a
  tensor of inputs, e.g. meta-training or support examples) instead sets every layer's
  running statistics to the exact mean and (unbiased) variance of its input over ``x``, so
  ``.eval()`` predictions depend on one example at a time, as a deployed model should.

:func:`adapted_module` adapts to one task's support set first (the algorithm's own
``adapt``) and exports the adapted parameters at the stage they were reached.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from functional_meta.inner import Params
from functional_meta.steps import Algorithm, TrainState

__all__ = ["adapted_module", "to_module"]

BatchNorm = Literal["batch"] | torch.Tensor


def _at_stage(tensors: Params, own: dict[str, torch.Tensor], stage: int, what: str) -> Params:
    """``tensors`` shaped like the module's own: per-stage tensors sliced at ``stage``."""
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(
            f"{what}: do not match the module: missing {missing}, unexpected {unexpected}"
        )
    out = {}
    for name, value in tensors.items():
        shape = own[name].shape
        if value.shape == shape:
            out[name] = value.detach().clone()
        elif value.dim() == len(shape) + 1 and value.shape[1:] == shape:
            out[name] = value[min(stage, value.shape[0] - 1)].detach().clone()
        else:
            raise ValueError(
                f"{what}[{name!r}]: shape {tuple(value.shape)} fits neither the module's "
                f"{tuple(shape)} nor a stage axis in front of it"
            )
    return out


def _estimate_running_statistics(module: nn.Module, x: torch.Tensor) -> None:
    """Every batch-norm layer's running mean and unbiased variance set to those of its input
    over ``x`` (one forward in training mode, cumulative averaging)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: one batch gives exactly its statistics
    module.train()
    with torch.no_grad():
        module(x)
    for layer, momentum in saved:
        layer.momentum = momentum
    module.eval()


def to_module(
    module: nn.Module,
    params: Params,
    buffers: Params,
    *,
    stage: int = 0,
    batch_norm: BatchNorm = "batch",
) -> nn.Module:
    """A copy of ``module`` (the one that was functionalized) holding ``params`` and
    ``buffers``, in ``.eval()`` mode; the given module is not changed.

    ``stage``: the slice of per-stage tensors to use (see the module docstring).
    ``batch_norm``: ``"batch"`` (reproduce the library: batch statistics in ``.eval()``) or
    a tensor of inputs ``[N, ...]`` to estimate running statistics from.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module: expected the nn.Module that was functionalized, got {type(module).__name__}"
        )
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise ValueError(f"stage: expected an integer >= 0, got {stage!r}")
    if not (isinstance(batch_norm, torch.Tensor) or batch_norm == "batch"):
        raise ValueError(f"batch_norm: expected 'batch' or a tensor of inputs, got {batch_norm!r}")
    exported = copy.deepcopy(module)
    own_params = dict(exported.named_parameters())
    own_buffers = dict(exported.named_buffers())
    state = {
        **_at_stage(params, own_params, stage, "params"),
        **_at_stage(buffers, own_buffers, stage, "buffers"),
    }
    exported.load_state_dict(state, strict=True)
    if isinstance(batch_norm, torch.Tensor):
        _estimate_running_statistics(exported, batch_norm)
    else:
        for layer in exported.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.track_running_stats = False
                layer.running_mean = layer.running_var = layer.num_batches_tracked = None
    return exported.eval()


def adapted_module(
    algorithm: Algorithm,
    state: TrainState,
    module: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    steps: int | None = None,
    batch_norm: BatchNorm = "batch",
) -> nn.Module:
    """``module`` adapted to one task: the algorithm's ``adapt`` on ``support_x [S, ...]``,
    ``support_y [S, ...]`` for ``steps`` inner steps (``None``: as trained), exported by
    :func:`to_module` at the stage the adaptation reached. For algorithms whose ``adapt``
    returns parameters (MAML, ANIL, Meta-SGD, MAML++, Reptile)."""
    with torch.no_grad():
        adapted = algorithm.adapt(state.meta_params, state.buffers, support_x, support_y, steps)
    if not all(hasattr(adapted, field) for field in ("params", "buffers", "stage")):
        raise TypeError(
            f"algorithm: {algorithm.name}'s adapt returns {type(adapted).__name__}, not adapted "
            "parameters; export its meta-parameters with to_module instead"
        )
    return to_module(module, adapted.params, adapted.buffers, stage=adapted.stage,
                     batch_norm=batch_norm)  # fmt: skip
