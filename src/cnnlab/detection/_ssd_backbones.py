"""SSD's feature maps and head: the VGG-16 base network of SSD300, extra layers, any classifier as a base.

Liu et al. 2016, §3 and Fig. 2: VGG-16 with pool5 made 3 x 3 / stride 1, fc6 and fc7 turned into convs (fc6
3 x 3 dilated by 6, fc7 1 x 1: DeepLab-LargeFOV's conversion), pool3 in ceil mode (75 -> 38 at 300 px), conv4_3
L2-normalised with a learnt per-channel scale starting at 20 (ParseNet), then extra layers (1 x 1 reduce, 3 x 3
stride 2 or unpadded) down to 1 x 1; each of the six maps gets a 3 x 3 conv predicting, per default box, K + 1
class scores and 4 offsets.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.layers import ConvNormAct
from cnnlab.layers.init import kaiming_init
from cnnlab.models.base import FeatureInfo
from cnnlab.models.vgg import VGG16, VGGStage

__all__ = ["L2Norm", "ExtraBlock", "SSD300_EXTRAS", "extra_layers", "SSDVGG16", "TappedBackbone", "SSDHead",
           "PredictionBlock", "xavier_init"]


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform conv weights, zero biases (the SSD Caffe code's, and torchvision's)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


class L2Norm(nn.Module):
    """Each position's channel vector scaled to unit L2 norm, then by a learnt per-channel scale (ParseNet, used by
    SSD on conv4_3, whose activations are much larger than the deeper maps').

    Args:
        channels: the channels normalised.
        scale: the scale's initial value (20 in SSD).
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels) * scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x)


@dataclass(frozen=True)
class ExtraBlock:
    """One extra layer (SSD Fig. 2): a 1 x 1 conv to ``mid_channels``, then a 3 x 3 conv to ``out_channels``."""

    mid_channels: int
    out_channels: int
    stride: int = 2
    padding: int = 1


# SSD300's conv8_2 .. conv11_2 (Liu et al. 2016, Fig. 2): 19 -> 10 -> 5 -> 3 -> 1
SSD300_EXTRAS = (ExtraBlock(256, 512), ExtraBlock(128, 256), ExtraBlock(128, 256, 1, 0), ExtraBlock(128, 256, 1, 0))


class ExtraLayer(nn.Sequential):
    """One extra block's two convs; on a CPU under autocast, a map of one row or column (1 x 1 is the case seen)
    goes through them in fp32. Why: torch 2.14.1's CPU bf16 convolution (oneDNN) returns NaN weight gradients now
    and then for a 3 x 3, stride-2, padding-1 conv on a 1 x 1 input (measured: 5-14 of 40 random trials, never in
    fp32 nor on 2 x 2 or larger inputs), which is where SSD's last extra blocks are at small sizes (128 px: maps
    4 -> 2 -> 1 -> 1), and one such step turns every weight into NaN. Such maps cost nothing in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        return one_pixel_in_fp32(super().forward, x)


def one_pixel_in_fp32(forward, x: Tensor) -> Tensor:
    """``forward(x)``, in fp32 when ``x`` is a map of one row or column on a CPU under autocast (see
    :class:`ExtraLayer` for why)."""
    if min(x.shape[-2:]) == 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())
    return forward(x)


def extra_layers(in_channels: int, blocks: Sequence[ExtraBlock]) -> nn.ModuleList:
    """The extra blocks after the base network, each an :class:`ExtraLayer` of two ``ConvNormAct`` (conv +
    ReLU)."""
    layers = nn.ModuleList()
    for block in blocks:
        layers.append(ExtraLayer(
            ConvNormAct(in_channels, block.mid_channels, 1, norm_layer=None),
            ConvNormAct(block.mid_channels, block.out_channels, 3, block.stride, block.padding, norm_layer=None),
        ))
        in_channels = block.out_channels
    xavier_init(layers)
    return layers


class SSDVGG16(nn.Module):
    """SSD300's base network and extra layers: images -> six maps (conv4_3 normalised, fc7, conv8_2 .. conv11_2).

    ``stages.0`` .. ``stages.4`` are VGG-16's conv1 .. conv5 (the VGG table, ``cnnlab.models.vgg.VGG16``), with
    the pools 1-3 at the end of their stages (pool3 in ceil mode), pool4 between conv4_3 and conv5_1, then
    pool5 (3 x 3 / 1), fc6 and fc7 as convs, and the extras.

    Args:
        stages: the VGG table (VGG-16's).
        extras: the extra blocks (SSD300's conv8 .. conv11).
        in_channels: image channels.
        trainable_layers: how many of the five VGG stages train, from the last (torchvision's
            ``trainable_backbone_layers``); fc6, fc7 and the extras always train.
    """

    def __init__(self, stages: Sequence[VGGStage] = VGG16, extras: Sequence[ExtraBlock] = SSD300_EXTRAS,
                 in_channels: int = 3, trainable_layers: int = 5) -> None:
        super().__init__()
        blocks, channels = [], in_channels
        for i, stage in enumerate(stages):
            block = nn.Sequential()
            for j in range(stage.num_convs):
                block.add_module(str(j), ConvNormAct(channels, stage.out_channels, 3, bias=True, norm_layer=None))
                channels = stage.out_channels
            if i < 3:  # pool1-3; pool3 rounds up so that 300 px gives conv4_3 a 38 x 38 map (as in Caffe)
                block.add_module("pool", nn.MaxPool2d(2, 2, ceil_mode=i == 2))
            blocks.append(block)
        self.stages = nn.Sequential(*blocks)
        kaiming_init(self.stages)  # VGG's own init (torchvision's); the layers SSD adds get Xavier's
        conv4_channels = stages[3].out_channels
        self.l2norm = L2Norm(conv4_channels, 20.0)
        self.pool4 = nn.MaxPool2d(2, 2)
        self.pool5 = nn.MaxPool2d(3, 1, 1)
        self.fc6 = ConvNormAct(channels, 1024, 3, padding=6, dilation=6, norm_layer=None)  # atrous (à trous) fc6
        self.fc7 = ConvNormAct(1024, 1024, 1, norm_layer=None)
        self.extras = extra_layers(1024, extras)
        xavier_init(nn.ModuleList([self.fc6, self.fc7]))
        self.out_channels = [conv4_channels, 1024] + [b.out_channels for b in extras]
        for stage in list(self.stages)[: len(stages) - trainable_layers]:
            stage.requires_grad_(False)

    def map_sides(self, side: int) -> list[int]:
        """The six maps' sides for an input side (300 -> 38, 19, 10, 5, 3, 1); a value < 1: too small an input."""
        sides = [side]
        for stage in list(self.stages)[:4]:
            pool = getattr(stage, "pool", None)
            if pool is not None:
                sides[0] = -(-sides[0] // 2) if pool.ceil_mode else sides[0] // 2
        sides.append(sides[0] // 2)  # pool4; pool5, fc6 and fc7 keep the size
        for block in self.extras:
            conv = block[1].conv
            k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
            sides.append((sides[-1] + 2 * p - k) // s + 1)
        return sides

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stages[:4](x)  # conv1_1 .. conv4_3: (B, 512, 38, 38) at 300 px
        maps = [self.l2norm(x)]
        x = self.stages[4](self.pool4(x))  # conv5_3 at stride 16
        x = self.fc7(self.fc6(self.pool5(x)))  # (B, 1024, 19, 19)
        maps.append(x)
        return with_extras(maps, self.extras)


def extra_strides(strides: list[int], extras: Sequence[ExtraBlock]) -> list[int]:
    """The maps' strides: ``strides`` and, after them, each extra block's (the previous one times its stride)."""
    for block in extras:
        strides.append(strides[-1] * block.stride)
    return strides


def with_extras(maps: list[Tensor], extras: nn.ModuleList) -> OrderedDict[str, Tensor]:
    """``maps`` and, after them, each extra block's output on the previous one: SSD's maps named "0", "1", ..."""
    x = maps[-1]
    for block in extras:
        x = block(x)
        maps.append(x)
    return OrderedDict((str(i), m) for i, m in enumerate(maps))


class TappedBackbone(nn.Module):
    """A classifier's stages (through ``feature_info``) and extra stride-2 blocks: images -> the SSD maps.

    Args:
        body: the classifier (cut after the last tapped stage, as ``build_backbone`` cuts it).
        stages: the ``FeatureInfo`` rows of the tapped stages, in order.
        extras: the extra blocks after the last stage.
        concat_deeper: give each stage's map the deeper stages' maps too, resized to it (bilinear) and
            concatenated along the channels: FSSD's fusion (Li & Zhou 2017) without its new layers, so the
            shallow maps classify with the deepest stage's (pretrained) semantics. The extra blocks still take
            the last stage's own map.
    """

    def __init__(self, body: nn.Module, stages: Sequence[FeatureInfo], extras: Sequence[ExtraBlock],
                 concat_deeper: bool = False) -> None:
        super().__init__()
        self.body = body
        self.stages = list(stages)
        self.concat_deeper = concat_deeper
        self.extras = extra_layers(self.stages[-1].channels, extras)
        widths = [s.channels for s in self.stages]
        if concat_deeper:
            widths = [sum(widths[i:]) for i in range(len(widths))]
        self.out_channels = widths + [b.out_channels for b in extras]
        self.strides = extra_strides([s.stride for s in self.stages], extras)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        from cnnlab.detection.backbone import run_tapped  # the stage taps build_backbone's Backbone uses

        taps = run_tapped(self.body, x, [s.module for s in self.stages])
        maps = [taps[s.module] for s in self.stages]
        if self.concat_deeper:  # the last stage has nothing deeper: its map, and so the extras' input, stay its own
            maps = [torch.cat([m] + [F.interpolate(d, size=m.shape[-2:], mode="bilinear", align_corners=False)
                                     for d in maps[i + 1:]], dim=1) for i, m in enumerate(maps)]
        return with_extras(maps, self.extras)


class PyramidBackbone(nn.Module):
    """The tapped stages through a feature pyramid, then the extra stride-2 blocks on its top level: images ->
    the SSD maps, each with the deepest stage's semantics (DSSD and FSSD's remedy, Fu et al. 2017, Li & Zhou
    2017, for SSD's shallow first map classifying the smallest objects).

    Args:
        backbone: a ``Backbone`` built with an FPN and no extra level (``extra_block="none"``).
        extras: the extra blocks after the top level.
    """

    def __init__(self, backbone: nn.Module, extras: Sequence[ExtraBlock]) -> None:
        super().__init__()
        self.backbone = backbone
        channels = backbone.out_channels
        self.extras = extra_layers(channels, extras)
        self.out_channels = [channels] * len(backbone.stages) + [b.out_channels for b in extras]
        self.strides = extra_strides(list(backbone.strides), extras)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return with_extras(list(self.backbone(x).values()), self.extras)


class PredictionBlock(nn.Module):
    """A residual block between a feature map and SSD's predictors (DSSD's prediction module, Fu et al. 2017,
    Fig. 4, which found a residual block per map better than predicting from the maps directly): ``relu(x +
    conv(relu(conv(x))))`` of two 3 x 3 convs of the map's width, without normalisation (SSD's head has none).
    The second conv starts at zero, so a new block is the identity and a pretrained backbone's maps reach the
    predictors unchanged at the first step. ``channels``: the map's."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        xavier_init(self)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return one_pixel_in_fp32(self._residual, x)  # 1 x 1 maps in fp32, as the extra blocks

    def _residual(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class SSDHead(nn.Module):
    """Per feature map, one 3 x 3 conv for the class scores and one for the box offsets of its default boxes.

    Outputs are (B, sum over maps of H W A, K + 1) and (B, ..., 4), position-major then box, as the default boxes.

    Args:
        in_channels: the channels of each map.
        num_anchors: default boxes per position on each map.
        num_classes: classes including the background.
        blocks: :class:`PredictionBlock` count per map, first map first (missing entries: 0); none by default,
            as the paper.
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 blocks: Sequence[int] = ()) -> None:
        super().__init__()
        self.in_channels, self.num_anchors = list(in_channels), list(num_anchors)
        self.cls_logits = self.predictors(num_classes)
        self.bbox_pred = self.predictors(4)
        self.num_classes = num_classes
        counts = list(blocks) + [0] * (len(self.in_channels) - len(blocks))
        # no module at all where a map has no block: the torchvision layout's state_dict stays as it is
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(*(PredictionBlock(c) for _ in range(n)))
                                     for i, (c, n) in enumerate(zip(self.in_channels, counts)) if n})

    def predictors(self, columns: int) -> nn.ModuleList:
        convs = nn.ModuleList(nn.Conv2d(c, columns * a, 3, padding=1)
                              for c, a in zip(self.in_channels, self.num_anchors))
        xavier_init(convs)
        return convs

    def reset_classifier(self, num_classes: int) -> None:
        device = self.cls_logits[0].weight.device
        self.cls_logits = self.predictors(num_classes).to(device)
        self.num_classes = num_classes

    @staticmethod
    def _flatten(convs: nn.ModuleList, maps: Sequence[Tensor], columns: int) -> Tensor:
        out = []
        for conv, x in zip(convs, maps):
            y = conv(x)
            n, _, h, w = y.shape
            # (B, A * C, H, W) -> (B, H W A, C)
            out.append(y.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns))
        return torch.cat(out, dim=1)

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """-> (class logits (B, D, K + 1), box offsets (B, D, 4))."""
        if len(self.blocks):
            maps = [self.blocks[str(i)](m) if str(i) in self.blocks else m for i, m in enumerate(maps)]
        return self._flatten(self.cls_logits, maps, self.num_classes), self._flatten(self.bbox_pred, maps, 4)
