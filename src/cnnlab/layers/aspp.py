"""Atrous spatial pyramid pooling (Chen et al., Rethinking Atrous Convolution, 2017, §3.3 and Fig. 5).

Parallel branches look at the same map with growing receptive fields at the same cost: a 1x1 conv,
three 3x3 convs of atrous (dilation) rates r1 < r2 < r3 (a rate-r 3x3 conv sees (2r + 1)^2 pixels with 9
weights), and image pooling (global average, 1x1 conv, bilinear up-sampling back: the image-level context
a very large rate loses, since most of its taps fall in the padding). The branches are concatenated and
projected by a 1x1 conv. The paper's rates are (6, 12, 18) at output stride 16 and twice those, (12, 24, 36),
at 8: the rates follow the feature map's resolution (:func:`atrous_rates`).

DeepLabv3+ (Chen et al. 2018, §3.2) makes the 3x3 branches depthwise-separable (``separable=True``).

state_dict keys: ``convs.0.conv.weight``/``convs.0.norm.*`` (1x1), ``convs.{1,2,3}.conv.weight`` (or
``.conv.depthwise.weight``, ``.conv.pointwise.weight`` when separable), ``convs.{1,2,3}.norm.*``,
``convs.4.proj.conv.weight``/``convs.4.proj.norm.*`` (image pooling), ``project.conv.weight``/``project.norm.*``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers.conv import ConvNormAct, SeparableConv2d, make_act

__all__ = ["ASPP", "ImagePooling", "SeparableConvNormAct", "atrous_rates", "PAPER_RATES"]

LayerFactory = Callable[..., nn.Module]

# Chen et al. 2017 §4.3 (and Table 1): rates (6, 12, 18) when the encoder's output stride is 16
PAPER_RATES = (6, 12, 18)


def atrous_rates(output_stride: int, base: Sequence[int] = PAPER_RATES) -> tuple[int, ...]:
    """The ASPP rates at ``output_stride``: ``base`` (the rates at stride 16) scaled by ``16 / output_stride``.

    (6, 12, 18) at 16, (12, 24, 36) at 8 (Chen et al. 2017 §4.3: "the rates are doubled when output_stride = 8");
    torchvision keeps (12, 24, 36) whatever the stride (vision#7956).
    """
    if output_stride not in (8, 16, 32):
        raise CnnlabError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return tuple(max(1, r * 16 // output_stride) for r in base)


class SeparableConvNormAct(nn.Sequential):
    """A depthwise-separable conv (``conv.depthwise``, ``conv.pointwise``, no bias), then norm and activation.

    Args:
        in_channels, out_channels, kernel_size, dilation: of the separable conv (same padding).
        norm_layer, act_layer: factories (None: absent).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerFactory | None = nn.BatchNorm2d, act_layer: LayerFactory | None = nn.ReLU) -> None:
        super().__init__()
        self.conv = SeparableConv2d(in_channels, out_channels, kernel_size, dilation=dilation, bias=False)
        if norm_layer is not None:
            self.norm = norm_layer(out_channels)
        if act_layer is not None:
            self.act = make_act(act_layer)
        self.out_channels = out_channels


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv + norm + act, bilinear back to the map's size.

    Args:
        in_channels, out_channels: of the 1x1 conv.
        norm_layer, act_layer: factories.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: LayerFactory | None = nn.BatchNorm2d,
                 act_layer: LayerFactory | None = nn.ReLU) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(self.pool(x))  # (B, C, H, W) -> (B, out, 1, 1)
        # from a 1x1 map every mode and align_corners give the same constant map (torchvision's call)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, three atrous 3x3 convs, image pooling; concatenated, projected.

    Args:
        in_channels: channels of the encoder's map.
        rates: the atrous rates of the 3x3 branches (:func:`atrous_rates`; the paper has three).
        out_channels: of every branch and of the projection (256).
        separable: depthwise-separable 3x3 branches (DeepLabv3+).
        dropout: after the projection (0.5 in torchvision and smp; 0.1 in the paper's DeepLabv3).
        norm_layer, act_layer: factories (batch norm and ReLU in the paper).
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256, *, separable: bool = False,
                 dropout: float = 0.5, norm_layer: LayerFactory | None = nn.BatchNorm2d,
                 act_layer: LayerFactory | None = nn.ReLU) -> None:
        super().__init__()
        rates = tuple(rates)
        if not rates or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rates):
            raise CnnlabError(f"ASPP rates must be positive ints such as (6, 12, 18), got {rates!r}")
        if not 0.0 <= dropout < 1.0:
            raise CnnlabError(f"ASPP dropout must be in [0, 1), got {dropout!r}")
        self.rates = rates
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer,
                                                 act_layer=act_layer)]
        for rate in rates:
            if separable:
                branches.append(SeparableConvNormAct(in_channels, out_channels, 3, dilation=rate,
                                                     norm_layer=norm_layer, act_layer=act_layer))
            else:
                branches.append(ConvNormAct(in_channels, out_channels, 3, dilation=rate, norm_layer=norm_layer,
                                            act_layer=act_layer))
        branches.append(ImagePooling(in_channels, out_channels, norm_layer, act_layer))
        self.convs = nn.ModuleList(branches)
        self.project = ConvNormAct(len(branches) * out_channels, out_channels, 1, norm_layer=norm_layer,
                                   act_layer=act_layer)
        self.dropout = nn.Dropout(dropout)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([branch(x) for branch in self.convs], dim=1)  # (B, 5 * out, H, W)
        return self.dropout(self.project(y))
