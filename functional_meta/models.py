"""The standard networks of the meta-learning papers, as plain ``nn.Module`` builders.

Functionalize them with ``functional_meta.functionalize``; the layer names (``features.0``,
``head``) are stable so parameter filters such as ANIL's ``head.`` prefix can rely on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import nn

__all__ = ["conv4", "mlp"]


def mlp(sizes: Sequence[int] = (1, 40, 40, 1)) -> nn.Sequential:
    """A ReLU multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` (the MAML paper's
    sinusoid regressor is the default ``1-40-40-1``). The last layer is ``head``."""
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mlp: sizes must be at least two positive integers, got {sizes}")
    body: list[nn.Module] = []
    for fan_in, fan_out in pairwise(sizes[:-1]):
        body += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*body))
    model.add_module("head", nn.Linear(sizes[-2], sizes[-1]))
    return model


def conv4(
    ways: int,
    *,
    in_channels: int = 1,
    hidden: int = 64,
    image_size: int = 28,
    pooling: str = "stride",
) -> nn.Sequential:
    """The four-block convolutional network of Vinyals et al. 2016 / Finn et al. 2017.

    Each block is ``3×3 conv (hidden filters) → BatchNorm → ReLU`` with downsampling by 2:
    strided convolutions (``pooling="stride"``, Finn et al.'s choice for Omniglot) or
    ``2×2`` max-pooling (``"max"``, their MiniImagenet choice). A linear ``head`` maps the
    flattened features to ``ways`` logits. Input ``[N, in_channels, image_size, image_size]``,
    output ``[N, ways]``.
    """
    if ways < 2:
        raise ValueError(f"conv4: ways must be >= 2, got {ways}")
    if pooling not in ("stride", "max"):
        raise ValueError(f"conv4: pooling must be 'stride' or 'max', got {pooling!r}")
    blocks: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        if pooling == "stride":
            blocks += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1)]
            size = (size + 1) // 2
        else:
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1)]
        blocks += [nn.BatchNorm2d(hidden), nn.ReLU()]
        if pooling == "max":
            blocks += [nn.MaxPool2d(2)]
            size //= 2
        channels = hidden
    if size < 1:
        raise ValueError(f"conv4: image_size {image_size} is too small for four downsamplings")
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*blocks, nn.Flatten()))
    model.add_module("head", nn.Linear(hidden * size * size, ways))
    return model
