"""The Inception module of GoogLeNet (Szegedy et al., 2014, "Going deeper with convolutions", Fig. 2b)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.layers.conv import ConvNormAct

LayerFactory = Callable[..., nn.Module]


class InceptionModule(nn.Module):
    """Four parallel branches whose outputs are concatenated along the channels.

    ``branch1``: 1x1 conv; ``branch2``: 1x1 reduce -> 3x3; ``branch3``: 1x1 reduce -> large
    kernel (5x5 in the paper); ``branch4``: 3x3/1 max pool -> 1x1 projection. The 1x1
    reductions are what keep GoogLeNet cheap: they shrink the channels before the costly
    3x3 and 5x5 convolutions.

    Args:
        in_channels: channels of the input.
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj: widths, named as the columns of
            the paper's Table 1 (``#1x1``, ``#3x3 reduce``, ``#3x3``, ``#5x5 reduce``,
            ``#5x5``, ``pool proj``).
        large_kernel_size: kernel of branch 3: 5 in the paper; torchvision's GoogLeNet uses 3
            (pytorch/vision#906), which its pretrained weights need.
        norm_layer, act_layer: factories for every conv of the module (``ConvNormAct``).
        attn_layer: optional attention applied to the concatenated output, called with its
            channel count (``SqueezeExcite`` gives SE-Inception, Hu et al. 2018 Fig. 2).

    Output channels: ``ch1x1 + ch3x3 + ch5x5 + pool_proj`` (``self.out_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        *,
        large_kernel_size: int = 5,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        attn_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int) -> ConvNormAct:
            return ConvNormAct(cin, cout, k, norm_layer=norm_layer, act_layer=act_layer)

        self.branch1 = conv(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, large_kernel_size))
        # ceil_mode as torchvision; with stride 1 and padding 1 it never changes the size
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), conv(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.attn = attn_layer(self.out_channels) if attn_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return self.attn(torch.cat(branches, 1))  # (B, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W)
