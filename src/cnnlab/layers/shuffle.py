"""ShuffleNet units: v1 (Zhang et al., 2018, Fig. 2) and v2 (Ma et al., 2018, Fig. 3).

v1 makes 1x1 convolutions cheap by grouping them, and a channel shuffle lets information
cross the groups. v2 drops the grouped convs (guideline G2: group convs cost memory
access) and splits the channels instead: half pass through untouched, half go through
the branch, and a shuffle mixes the halves for the next unit.

Children of both units: ``branch`` (and ``shortcut`` for stride 2); branch convs are
``ConvNormAct`` named ``conv1``, ``conv2`` (the 3x3 depthwise), ``conv3``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers.conv import ConvNormAct, channel_shuffle, make_act

LayerFactory = Callable[..., nn.Module]


class ChannelShuffle(nn.Module):
    """Channel shuffle as a layer: (B, g*n, H, W) -> (B, n*g, H, W), channel ``i*n + j`` moves to ``j*g + i``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ShuffleUnitV1(nn.Module):
    """ShuffleNet v1 unit (Fig. 2b, 2c).

    Branch: 1x1 group conv (BN, ReLU) -> channel shuffle -> 3x3 depthwise conv (BN, stride)
    -> 1x1 group conv (BN). Stride 1: ``relu(branch(x) + x)``. Stride 2: the shortcut is a 3x3
    average pool (stride 2) and the outputs are concatenated, ``relu(cat(shortcut(x), branch(x)))``,
    so the branch makes only ``out_channels - in_channels`` maps.

    Args:
        in_channels, out_channels: of the unit.
        stride: 1 or 2.
        groups: groups of the 1x1 convs.
        first_grouped: False for the very first unit, whose input is too narrow to group (paper §3.3).
        bottleneck_ratio: branch width as a fraction of ``out_channels`` (1/4 in the paper).
        norm_layer, act_layer: factories.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 3,
        first_grouped: bool = True,
        bottleneck_ratio: float = 0.25,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise CnnlabError(f"ShuffleUnitV1 stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise CnnlabError(
                f"a stride-1 ShuffleUnitV1 adds its input: in_channels ({in_channels}) must equal out_channels ({out_channels})"
            )
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        mid = int(out_channels * bottleneck_ratio)
        first_groups = groups if first_grouped else 1
        checks = (("in_channels", in_channels, first_groups), ("bottleneck channels", mid, groups),
                  ("branch output channels (out - in at stride 2)", branch_out, groups))
        for what, value, divisor in checks:
            if value <= 0 or value % divisor:
                raise CnnlabError(f"ShuffleUnitV1: {what} = {value} must be a positive multiple of groups ({divisor})")
        self.stride = stride
        self.branch = nn.Sequential(OrderedDict(
            conv1=ConvNormAct(in_channels, mid, 1, groups=first_groups, norm_layer=norm_layer, act_layer=act_layer),
            # after a dense (ungrouped) conv1 every channel already sees every input: nothing to shuffle
            shuffle=ChannelShuffle(groups) if first_groups > 1 else nn.Identity(),
            conv2=ConvNormAct(mid, mid, 3, stride=stride, groups=mid, norm_layer=norm_layer, act_layer=None),
            conv3=ConvNormAct(mid, branch_out, 1, groups=groups, norm_layer=norm_layer, act_layer=None),
        ))
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act = make_act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return self.act(self.branch(x) + x)
        return self.act(torch.cat((self.shortcut(x), self.branch(x)), 1))


class ShuffleUnitV2(nn.Module):
    """ShuffleNet v2 unit (Fig. 3c, 3d).

    Stride 1: channel split; the left half is kept as is, the right half goes through 1x1 conv
    (BN, ReLU) -> 3x3 depthwise (BN) -> 1x1 conv (BN, ReLU); concatenate, shuffle with 2 groups.
    Stride 2: no split; the left half is a ``shortcut`` branch (3x3 depthwise stride 2 (BN) ->
    1x1 conv (BN, ReLU)), the right the same branch as above with a stride-2 depthwise conv.
    Each branch makes ``out_channels // 2`` maps.

    Args:
        in_channels, out_channels: of the unit.
        stride: 1 or 2.
        norm_layer, act_layer: factories.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise CnnlabError(f"ShuffleUnitV2 stride must be 1 or 2, got {stride}")
        if out_channels % 2 or (stride == 1 and in_channels != out_channels):
            raise CnnlabError(
                f"ShuffleUnitV2 needs an even out_channels, equal to in_channels at stride 1; got {in_channels} -> {out_channels}"
            )
        self.stride = stride
        half = out_channels // 2
        branch_in = in_channels if stride == 2 else half
        if stride == 2:
            self.shortcut = nn.Sequential(OrderedDict(
                conv1=ConvNormAct(in_channels, in_channels, 3, stride=2, groups=in_channels, norm_layer=norm_layer, act_layer=None),
                conv2=ConvNormAct(in_channels, half, 1, norm_layer=norm_layer, act_layer=act_layer),
            ))
        self.branch = nn.Sequential(OrderedDict(
            conv1=ConvNormAct(branch_in, half, 1, norm_layer=norm_layer, act_layer=act_layer),
            conv2=ConvNormAct(half, half, 3, stride=stride, groups=half, norm_layer=norm_layer, act_layer=None),
            conv3=ConvNormAct(half, half, 1, norm_layer=norm_layer, act_layer=act_layer),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # channel split
            out = torch.cat((x1, self.branch(x2)), 1)
        else:
            out = torch.cat((self.shortcut(x), self.branch(x)), 1)
        return channel_shuffle(out, 2)

