"""Small networks for the gradient-flow demonstrations in docs/analysis.md (not registered models).

``deep_mlp``: a stack of Linear + activation, for vanishing gradients with sigmoid/tanh vs ReLU.
``deep_cnn``: a plain stack of conv-BN-ReLU pairs, or the same with identity shortcuts
(He et al. 2016's plain vs residual comparison, CIFAR-sized).
``cifar_cnn``: He et al. 2016's CIFAR-10 nets (§4.2): 6n+2 layers in 3 stages at 16/32/64 channels,
plain or residual with parameter-free shortcuts, so both versions have the same weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cnnlab._errors import CnnlabError

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
    """conv-BN-ReLU-conv-BN, then ReLU of (that + shortcut(x)) with ``residual`` or of that alone without.

    Args:
        channels: input channels.
        residual: add the shortcut (He et al. 2016) or not (the plain net).
        out_channels: output channels (default ``channels``).
        stride: stride of the first conv; with ``stride`` 2 and more output channels the shortcut is
            He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters).
    """

    def __init__(self, channels: int, residual: bool, out_channels: int | None = None, stride: int = 1) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.residual, self.stride, self.pad = residual, stride, out_channels - channels
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]  # matches the 3x3/stride-2 conv's output grid (padding 1)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x  # zero channels appended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x) if self.residual else out)


def deep_cnn(blocks: int = 20, channels: int = 16, residual: bool = False, num_classes: int = 10,
             in_channels: int = 3) -> nn.Sequential:
    """A stem conv, ``blocks`` two-conv blocks (2 * blocks + 2 weight layers), global pool, classifier."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1),
                         *[_Block(channels, residual) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


@dataclass(frozen=True)
class CifarStage:
    """One stage of He et al. 2016's CIFAR nets (§4.2): ``blocks`` two-conv blocks at ``channels``."""

    channels: int
    stride: int  # of the stage's first block: the feature map halves as the channels double


def cifar_stages(width: int = 16) -> tuple[CifarStage, ...]:
    """He et al. 2016 §4.2: feature maps 32/16/8 with 16/32/64 filters (``width`` = 16)."""
    return CifarStage(width, 1), CifarStage(2 * width, 2), CifarStage(4 * width, 2)


def cifar_cnn(depth: int = 20, residual: bool = False, width: int = 16, in_channels: int = 3, num_classes: int = 10,
              init: str = "he") -> nn.Sequential:
    """He et al. 2016's CIFAR-10 net of ``depth`` = 6n + 2 weight layers: conv-BN-ReLU stem, 3 stages of n blocks,
    global average pool, classifier. Plain and residual versions have exactly the same parameters.

    ``init`` 'he' is the paper's (Kaiming normal, fan_out) for the convs; 'default' keeps PyTorch's.
    """
    if depth < 8 or (depth - 2) % 6:
        raise CnnlabError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    if width < 1 or in_channels < 1 or num_classes < 1:
        raise CnnlabError(f"width, in_channels and num_classes must be >= 1, got {width}, {in_channels}, {num_classes}")
    if init not in ("he", "default"):
        raise CnnlabError(f"init must be 'he' or 'default', got {init!r}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage in cifar_stages(width):
        for i in range(n):
            layers.append(_Block(channels, residual, stage.channels, stage.stride if i == 0 else 1))
            channels = stage.channels
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    if init == "he":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
