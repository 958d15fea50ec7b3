"""Channel attention: squeeze-and-excitation, pluggable into any block as ``attn_layer``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.layers.conv import make_act


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): global pool -> FC reduce -> act -> FC expand -> gate.

    Args:
        channels: channels of the feature map it re-weights.
        rd_ratio: reduction ratio (1/16 in SENet); ignored when ``rd_channels`` is given.
        rd_channels: explicit width of the bottleneck.
        act_layer: activation between the two FCs (ReLU in SENet, SiLU in EfficientNet).
        gate_layer: the gate (Sigmoid; Hardsigmoid in MobileNet v3).

    Children ``fc1``/``fc2`` are 1x1 convs (the same weights as timm's SE layers).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        gate_layer: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        rd_channels = rd_channels or max(1, round(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = make_act(act_layer)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # squeeze: (B, C, H, W) -> (B, C, 1, 1)
        s = self.fc2(self.act(self.fc1(s)))  # excite
        return x * self.gate(s)
