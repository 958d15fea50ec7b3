"""Residual blocks: basic and bottleneck (He et al. 2016), and their pre-activation forms (He et al. 2016b).

Every block computes ``out = act(residual(x) + shortcut(x))`` (post-activation) or
``out = residual(preact(x)) + shortcut(x)`` (pre-activation). The shortcut is the
identity when shape is kept, else a projection: a strided 1x1 conv (+ norm in the
post-activation blocks), the paper's option B.

Blocks take layer factories: ``norm_layer`` (called with a channel count),
``act_layer`` (called with no argument), ``attn_layer`` (called with a channel count,
e.g. ``functools.partial(SqueezeExcite, rd_ratio=1/16)`` for SE-ResNet: the attention
re-weights the residual branch just before the addition, as in Hu et al. 2018, Fig. 3).
``zero_init_last()`` makes the block start as its shortcut (Goyal et al. 2017);
``cnnlab.layers.zero_init_last_norm(model)`` calls it on every block.

state_dict keys of a post-activation Bottleneck (BasicBlock has conv1, conv2 only)::

    residual.conv{1,2,3}.conv.weight, residual.conv{1,2,3}.norm.*   (ConvNormAct)
    residual.attn.*                                                 (when attn_layer is set)
    shortcut.conv.weight, shortcut.norm.*                           (projection shortcut only)

and of a pre-activation block::

    preact.norm.*, residual.conv1.weight, residual.norm2.*, residual.conv2.weight,
    [residual.norm3.*, residual.conv3.weight (bottleneck)], [residual.attn.*], [shortcut.weight]
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers.conv import ConvNormAct, make_act
from cnnlab.layers.drop import DropPath

LayerFactory = Callable[..., nn.Module]


def _tail(attn_layer: LayerFactory | None, channels: int, drop_path: float) -> list[tuple[str, nn.Module]]:
    """The optional end of a residual branch: attention, then stochastic depth."""
    tail: list[tuple[str, nn.Module]] = []
    if attn_layer is not None:
        tail.append(("attn", attn_layer(channels)))
    if drop_path > 0.0:
        tail.append(("drop_path", DropPath(drop_path)))
    return tail


def projection_shortcut(
    in_channels: int, out_channels: int, stride: int, norm_layer: LayerFactory | None
) -> nn.Module:
    """Identity when the shape is kept, else a strided 1x1 conv + norm (He et al. 2016, option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvNormAct(in_channels, out_channels, 1, stride, norm_layer=norm_layer, act_layer=None)


class _PostActBlock(nn.Module):
    """What the post-activation blocks share: a subclass passes its branch's convs (ConvNormAct,
    named ``conv1``, ``conv2``, ... here); attention, stochastic depth, shortcut and act are common."""

    def __init__(self, convs: list[nn.Module], in_channels: int, out_channels: int, stride: int,
                 norm_layer: LayerFactory | None, act_layer: LayerFactory, attn_layer: LayerFactory | None,
                 drop_path: float) -> None:
        super().__init__()
        named = [(f"conv{i}", conv) for i, conv in enumerate(convs, start=1)]
        self.residual = nn.Sequential(OrderedDict(named + _tail(attn_layer, out_channels, drop_path)))
        self.shortcut = projection_shortcut(in_channels, out_channels, stride, norm_layer)
        self.act = make_act(act_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))

    def last_norm(self) -> nn.Module | None:
        last = [m for name, m in self.residual.named_children() if name.startswith("conv")][-1]
        return getattr(last, "norm", None)

    def zero_init_last(self) -> None:
        """Zero the residual branch's last norm weight: the block then outputs act(shortcut(x))."""
        norm = self.last_norm()
        if norm is not None and getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)


class BasicBlock(_PostActBlock):
    """Two 3x3 convs with a shortcut (ResNet-18/34; He et al. 2016, Fig. 5 left).

    Args:
        in_channels: input channels.
        out_channels: output channels (``expansion`` is 1).
        stride: stride of the first conv (2 at the start of conv3_x .. conv5_x).
        groups, base_width: must stay 1 and 64 (grouped/wide variants use Bottleneck).
        dilation: dilation of the second conv; ``first_dilation`` that of the first (default the same).
        norm_layer, act_layer, attn_layer: layer factories; ``attn_layer`` None means no attention.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        attn_layer: LayerFactory | None = None,
        drop_path: float = 0.0,
    ) -> None:
        if groups != 1 or base_width != 64:
            raise CnnlabError(
                f"BasicBlock supports groups=1 and base_width=64 only, got groups={groups}, base_width={base_width}; "
                "grouped (ResNeXt) and wide variants use Bottleneck"
            )
        first_dilation = first_dilation or dilation
        convs = [
            ConvNormAct(in_channels, out_channels, 3, stride, dilation=first_dilation,
                        norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(out_channels, out_channels, 3, dilation=dilation, norm_layer=norm_layer, act_layer=None),
        ]
        super().__init__(convs, in_channels, out_channels, stride, norm_layer, act_layer, attn_layer, drop_path)


class Bottleneck(_PostActBlock):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50+; He et al. 2016, Fig. 5 right), with ResNeXt groups.

    The 3x3 conv carries the stride (torchvision's "ResNet v1.5"). Its width is
    ``out_channels / 4 * base_width / 64 * groups``: ResNet (64, 1), ResNeXt-32x4d
    (``base_width=4, groups=32``), Wide ResNet-50-2 (``base_width=128``).

    Args:
        in_channels: input channels.
        out_channels: output channels, ``expansion`` (4) times the stage's base width.
        stride: stride of the 3x3 conv.
        groups: cardinality of the grouped 3x3 conv (Xie et al. 2017).
        base_width: width per group at the first stage (64 for ResNet).
        dilation: dilation of the 3x3 conv; ``first_dilation`` for the first block of a dilated stage.
        norm_layer, act_layer, attn_layer: layer factories; ``attn_layer`` None means no attention.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        attn_layer: LayerFactory | None = None,
        drop_path: float = 0.0,
    ) -> None:
        if out_channels % self.expansion:
            raise CnnlabError(f"Bottleneck out_channels must be a multiple of {self.expansion}, got {out_channels}")
        width = int(out_channels // self.expansion * (base_width / 64.0)) * groups
        first_dilation = first_dilation or dilation
        convs = [
            ConvNormAct(in_channels, width, 1, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(width, width, 3, stride, dilation=first_dilation, groups=groups,
                        norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(width, out_channels, 1, norm_layer=norm_layer, act_layer=None),
        ]
        super().__init__(convs, in_channels, out_channels, stride, norm_layer, act_layer, attn_layer, drop_path)


class NormAct(nn.Sequential):
    """Norm then activation: the "pre-activation" that opens every pre-activation unit."""

    def __init__(self, channels: int, norm_layer: LayerFactory = nn.BatchNorm2d, act_layer: LayerFactory = nn.ReLU) -> None:
        super().__init__()
        self.norm = norm_layer(channels)
        self.act = make_act(act_layer)


class _PreActBlock(nn.Module):
    """What the pre-activation blocks share (He et al. 2016b, Fig. 1b / 4e).

    A subclass builds its branch's bare convs and passes them here. The first conv reads
    the shared ``preact`` (BN-ReLU); every later conv ``i`` gets its own ``norm{i}``,
    ``act{i}`` in front, and the optional dropout sits just before ``conv2`` (WRN's place,
    between the two 3x3 convs; the bottleneck's 3x3). Then attention and stochastic depth.
    The shortcut is the identity or a strided 1x1 conv, without norm.
    """

    def __init__(self, convs: list[nn.Conv2d], in_channels: int, out_channels: int, stride: int, drop_rate: float,
                 norm_layer: LayerFactory, act_layer: LayerFactory, attn_layer: LayerFactory | None,
                 drop_path: float) -> None:
        super().__init__()
        self.preact = NormAct(in_channels, norm_layer, act_layer)
        layers: list[tuple[str, nn.Module]] = [("conv1", convs[0])]
        for i, conv in enumerate(convs[1:], start=2):
            layers += [(f"norm{i}", norm_layer(conv.in_channels)), (f"act{i}", make_act(act_layer))]
            if i == 2 and drop_rate > 0.0:
                layers.append(("dropout", nn.Dropout(drop_rate)))
            layers.append((f"conv{i}", conv))
        self.residual = nn.Sequential(OrderedDict(layers + _tail(attn_layer, out_channels, drop_path)))
        self.shortcut = _plain_shortcut(in_channels, out_channels, stride)
        self.projection = not isinstance(self.shortcut, nn.Identity)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.preact(x)
        # A projection reads the pre-activated input (as in the papers' code: the BN-ReLU is
        # shared by both paths); an identity shortcut carries x itself, untouched.
        shortcut = self.shortcut(pre) if self.projection else x
        return self.residual(pre) + shortcut

    def zero_init_last(self) -> None:
        """Zero the branch's last conv (no norm follows it here): the block then outputs its shortcut."""
        last = [m for name, m in self.residual.named_children() if name.startswith("conv")][-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)


def _plain_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class PreActBasicBlock(_PreActBlock):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3 with an identity path (He et al. 2016b); Wide ResNet's block.

    Args:
        in_channels, out_channels, stride: as in BasicBlock (the first conv carries the stride).
        drop_rate: dropout between the two convs (Zagoruyko & Komodakis 2016 use 0.3).
        norm_layer, act_layer, attn_layer: layer factories; ``attn_layer`` None means no attention.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        drop_rate: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        attn_layer: LayerFactory | None = None,
        drop_path: float = 0.0,
    ) -> None:
        convs = [
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
        ]
        super().__init__(convs, in_channels, out_channels, stride, drop_rate,
                         norm_layer, act_layer, attn_layer, drop_path)


class PreActBottleneck(_PreActBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (He et al. 2016b; ResNet-164 and -1001).

    Args:
        in_channels: input channels.
        out_channels: output channels, ``expansion`` (4) times the 3x3 conv's width.
        stride: stride of the 3x3 conv.
        drop_rate: dropout before the 3x3 conv (0 in the paper).
        norm_layer, act_layer, attn_layer: layer factories; ``attn_layer`` None means no attention.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        drop_rate: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        attn_layer: LayerFactory | None = None,
        drop_path: float = 0.0,
    ) -> None:
        if out_channels % self.expansion:
            raise CnnlabError(f"PreActBottleneck out_channels must be a multiple of {self.expansion}, got {out_channels}")
        width = out_channels // self.expansion
        convs = [
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.Conv2d(width, out_channels, 1, bias=False),
        ]
        super().__init__(convs, in_channels, out_channels, stride, drop_rate,
                         norm_layer, act_layer, attn_layer, drop_path)
