"""The Fire module of SqueezeNet (Iandola et al., 2016, "SqueezeNet", Fig. 1)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.layers.conv import ConvNormAct

LayerFactory = Callable[..., nn.Module]


class Fire(nn.Module):
    """Squeeze with 1x1 convs, then expand with 1x1 and 3x3 convs side by side, concatenated.

    The squeeze layer has fewer channels than the expand layers take in (the paper's
    strategy 2: fewer inputs to the 3x3 filters), and half the expand filters are 1x1
    (strategy 1: replace 3x3 by 1x1 filters): both cut parameters.

    Args:
        in_channels: channels of the input.
        squeeze_channels: 1x1 squeeze filters (the paper's ``s1x1``).
        expand1x1_channels, expand3x3_channels: expand filters (``e1x1``, ``e3x3``).
        norm_layer: None in the paper; a factory adds normalisation after every conv.
        act_layer: ReLU in the paper.

    Output channels: ``expand1x1_channels + expand3x3_channels`` (``self.out_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        squeeze_channels: int,
        expand1x1_channels: int,
        expand3x3_channels: int,
        *,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.squeeze = ConvNormAct(in_channels, squeeze_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.expand1x1 = ConvNormAct(squeeze_channels, expand1x1_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.expand3x3 = ConvNormAct(squeeze_channels, expand3x3_channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.out_channels = expand1x1_channels + expand3x3_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)  # (B, e1x1 + e3x3, H, W)
