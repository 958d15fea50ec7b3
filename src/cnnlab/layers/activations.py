"""Activations by name, and Maxout."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": partial(nn.LeakyReLU, 0.1),  # the notes' table uses slope 0.1
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hard_swish": nn.Hardswish,
    "hard_sigmoid": nn.Hardsigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def get_act_layer(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """An activation factory from a name (``"relu"``, ``"swish"``, ...), a factory, or None."""
    if name is None or callable(name):
        return name
    key = name.lower().replace("-", "_")
    if key not in ACTIVATIONS:
        raise CnnlabError(f"unknown activation {name!r}{did_you_mean(key, ACTIVATIONS)} (choose from {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[key]


class Maxout(nn.Module):
    """Maxout unit: the max over ``pieces`` affine maps (k times the parameters of one map).

    Implemented as a 1x1 convolution to ``out_channels * pieces`` maps, then a max over
    each group of ``pieces``. Use on (B, C, H, W) tensors; for vectors, add two unit dims.
    """

    def __init__(self, in_channels: int, out_channels: int, pieces: int = 2) -> None:
        super().__init__()
        self.pieces = pieces
        self.out_channels = out_channels
        self.linear = nn.Conv2d(in_channels, out_channels * pieces, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (B, C*k, H, W)
        b, _, h, w = y.shape
        return y.view(b, self.out_channels, self.pieces, h, w).amax(dim=2)
