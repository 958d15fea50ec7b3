"""The pyramid pooling module of PSPNet (Zhao et al., Pyramid Scene Parsing Network, CVPR 2017, Fig. 3).

The feature map is average-pooled into ``b x b`` bins for each ``b`` of the pyramid (1, 2, 3, 6 in the
paper: the whole image, halves, thirds, sixths), each pooled map is reduced by a 1x1 conv to
``in_channels / len(bins)`` channels, up-sampled bilinearly back to the map's size and concatenated with
the map itself: global context at four scales next to the local features, ``2 * in_channels`` channels
out with the default branch width.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers.conv import ConvNormAct

__all__ = ["PyramidPooling", "PyramidPoolingBranch"]


class PyramidPoolingBranch(nn.Module):
    """One level of the pyramid: adaptive average pool to ``bins x bins``, 1x1 conv (+norm) + act, up-sample.

    Args:
        in_channels, out_channels: channels of the map and of this branch's output.
        bins: the pooled grid's side.
        norm_layer, act_layer: factories of the 1x1 conv's normalisation (None: a conv bias) and activation.
        align_corners: of the bilinear up-sampling (smp: True; mmsegmentation: False).
    """

    def __init__(self, in_channels: int, out_channels: int, bins: int,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] | None = nn.ReLU, align_corners: bool = True) -> None:
        super().__init__()
        self.bins, self.align_corners = bins, align_corners
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.proj = ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.proj(self.pool(x))  # (B, C, H, W) -> (B, C', bins, bins)
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: ``cat([branch_1(x), ..., branch_n(x), x])``.

    Args:
        in_channels: channels of the input map.
        bins: grid sides of the pyramid levels (the paper's 1, 2, 3, 6).
        branch_channels: output channels of every branch; None: ``in_channels // len(bins)`` (the paper's 1/N).
        norm_layer, act_layer: of the branches' 1x1 convs.
        global_norm: normalise the 1x1 (global) bin too. A batch norm over a 1x1 map sees one value per image,
            so smp leaves it out there (a conv bias instead; False); the paper and mmsegmentation keep it (True).
        align_corners: of the branches' bilinear up-sampling.

    The output has ``in_channels + len(bins) * branch_channels`` channels (``out_channels``); the branches come
    first and the input last, smp's order (the paper's figure draws the input first: only the next conv's
    weight layout depends on it).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6), branch_channels: int | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] | None = nn.ReLU, global_norm: bool = False,
                 align_corners: bool = True) -> None:
        super().__init__()
        if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
            raise CnnlabError(f"pyramid pooling bins must be positive ints (the paper's (1, 2, 3, 6)), got {bins!r}")
        if branch_channels is None:
            branch_channels = in_channels // len(bins)
        if branch_channels < 1:
            raise CnnlabError(f"pyramid pooling on {in_channels} channels with {len(bins)} bins leaves "
                              f"{branch_channels} channels per branch; give branch_channels >= 1")
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            PyramidPoolingBranch(in_channels, branch_channels, b,
                                 norm_layer=norm_layer if (b > 1 or global_norm) else None,
                                 act_layer=act_layer, align_corners=align_corners)
            for b in self.bins)
        self.out_channels = in_channels + len(self.bins) * branch_channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches] + [x], dim=1)  # (B, C, H, W) -> (B, 2C, H, W)
