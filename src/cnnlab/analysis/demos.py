"""Small networks for the gradient-flow demonstrations in docs/analysis.md (not registered models).

``deep_mlp``: a stack of Linear + activation, for vanishing gradients with sigmoid/tanh vs ReLU.
``deep_cnn``: a plain stack of conv-BN-ReLU pairs, or the same with identity shortcuts
(He et al. 2016's plain vs residual comparison, CIFAR-sized).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

INITS = ("default", "xavier", "he")


def deep_mlp(depth: int = 20, width: int = 64, in_features: int = 32, num_classes: int = 10,
             act_layer: Callable[[], nn.Module] = nn.ReLU, init: str = "default") -> nn.Sequential:
    """``depth`` Linear+activation layers, then a classifier.

    Args:
        init: 'default' (PyTorch's: weight variance 1/(3 fan_in)), 'xavier' (Glorot normal,
            made for tanh) or 'he' (Kaiming normal, made for ReLU); biases start at zero
            except with 'default'.
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(in_features if i == 0 else width, width)
        if init == "xavier":
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        elif init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, act_layer()]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN, then ReLU of (that + x) with ``residual`` or of that alone without."""

    def __init__(self, channels: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + x if self.residual else out)


def deep_cnn(blocks: int = 20, channels: int = 16, residual: bool = False, num_classes: int = 10) -> nn.Sequential:
    """A stem conv, ``blocks`` two-conv blocks (2 * blocks + 2 weight layers), global pool, classifier."""
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), *[_Block(channels, residual) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
