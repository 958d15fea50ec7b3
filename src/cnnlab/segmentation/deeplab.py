"""DeepLabv3 (Chen et al. 2017) and DeepLabv3+ (Chen et al. 2018): ``deeplabv3``, ``deeplabv3_resnet50``,
``deeplabv3plus``.

Atrous (dilated) convolution grows the receptive field without more parameters or less resolution: the
encoder's last stages keep their stride at 1 and dilate their convs instead (output stride 16 or 8: the
logits come from a map 16 or 8 times smaller than the image instead of 32, for basic-block ResNets too,
vision#4801). On that map, atrous spatial pyramid pooling (:class:`cnnlab.layers.aspp.ASPP`) runs a 1x1
conv, three 3x3 convs of rates (6, 12, 18) at output stride 16 or (12, 24, 36) at 8 (the rates follow the
map's resolution, vision#7956) and image pooling side by side; a 3x3 conv and a 1x1 classifier follow,
and the logits are interpolated bilinearly to the input size (torchvision's ``DeepLabHead``).

DeepLabv3+ adds a decoder (Chen et al. 2018, §3.1, Fig. 2): the ASPP output, up-sampled to the stride-4
"low-level" map of the encoder, is concatenated with that map reduced to 48 channels by a 1x1 conv, then
refined by a 3x3 conv; the logits are up-sampled 4x. Its defaults are smp's ``DeepLabV3Plus`` (output
stride 16, separable ASPP and decoder convs, rates (12, 24, 36), align_corners=True, every conv of a dilated
stage at the same rate), so ``smp.DeepLabV3Plus(NAME, encoder_weights=None, classes=K)`` state_dicts load with
``cnnlab.load_weights`` (layout ``"smp"``) and give the same logits. The paper's rates at output stride 16
are (6, 12, 18): pass ``atrous_rates=(6, 12, 18)``.

Output: ``(N, K, H, W)`` logits at the input size (any size); with ``aux_loss=True`` a dict ``{"out", "aux"}``.

state_dict keys: ``encoder.body.*``; DeepLabv3: ``head.aspp.*`` (see :mod:`cnnlab.layers.aspp`),
``head.block.conv.weight``/``head.block.norm.*``, ``head.classifier.*``, ``aux_head.*`` (an FCN head);
DeepLabv3+: ``decoder.aspp.*``, ``decoder.aspp_conv.*``, ``decoder.low_level.*``, ``decoder.fuse.*``, ``head.*``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.layers.aspp import ASPP, SeparableConvNormAct, atrous_rates
from cnnlab.models.catalog import StateDict
from cnnlab.models.registry import Family, register_model
from cnnlab.segmentation.encoder import Encoder, build_encoder, encoder_from_smp, find_stage, stage_table
from cnnlab.segmentation.fcn import (
    FCNHead,
    SimpleSegmentationModel,
    _head_encoder,
    _head_from_torchvision,
    _rename_heads,
    backbone_from_torchvision,
    check_num_classes,
)

__all__ = ["DeepLabHead", "DeepLabV3PlusConfig", "DeepLabV3PlusDecoder", "DeepLabV3Plus", "deeplabv3",
           "deeplabv3_resnet50", "deeplabv3plus", "from_torchvision", "deeplabv3plus_from_smp"]

DEEPLABV3 = Family("DeepLabv3", "Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation (2017)",
                   2017, "https://arxiv.org/abs/1706.05587")
DEEPLABV3PLUS = Family("DeepLabv3+", "Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic "
                       "Image Segmentation (ECCV 2018)", 2018, "https://arxiv.org/abs/1802.02611")


def _check_rates(rates: Any, model: str) -> tuple[int, ...]:
    if not isinstance(rates, Sequence) or len(rates) != 3 or any(
            not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rates):
        raise CnnlabError(f"{model}: atrous_rates must be three positive ints such as (6, 12, 18), got {rates!r}")
    return tuple(rates)


# -- DeepLabv3 -------------------------------------------------------------------------------------------------
class DeepLabHead(nn.Module):
    """torchvision's DeepLabv3 head: ASPP, a 3x3 conv + BN + ReLU, a 1x1 classifier.

    Args:
        in_channels: of the encoder's deepest map.
        num_classes: classes with the background.
        rates: the ASPP's atrous rates.
        channels: of the ASPP and the 3x3 conv (256).
        norm_layer: batch norm in the paper.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int], channels: int = 256,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, channels, norm_layer=norm_layer)
        self.block = ConvNormAct(channels, channels, 3, norm_layer=norm_layer)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.block(self.aspp(x)))


def _deeplabv3(name: str, backbone: str, *, num_classes: int, output_stride: int, rates: Sequence[int] | None,
               aux_loss: bool, in_channels: int, backbone_weights: str | os.PathLike | None,
               norm_layer: Any) -> SimpleSegmentationModel:
    check_num_classes(num_classes, name)
    if output_stride not in (8, 16):
        raise CnnlabError(f"{name}: output_stride must be 8 or 16 (atrous convolution in the last stages), "
                          f"got {output_stride!r}")
    rates = atrous_rates(output_stride) if rates is None else _check_rates(rates, name)
    encoder = _head_encoder(name, backbone, output_stride=output_stride, aux_loss=aux_loss, in_channels=in_channels,
                            backbone_weights=backbone_weights, norm_layer=norm_layer)
    aux = FCNHead(encoder.channels[-2], num_classes) if aux_loss else None
    model = SimpleSegmentationModel(encoder, DeepLabHead(encoder.channels[-1], num_classes, rates), aux)
    model.model_name = name
    return model


# torchvision's DeepLabHead is Sequential(ASPP, conv, bn, relu, conv); its ASPP branches are Sequential(conv, bn,
# relu), the pooling branch Sequential(pool, conv, bn, relu), the projection Sequential(conv, bn, relu, dropout)
DEEPLAB_HEAD_RULES = (
    (r"^classifier\.0\.convs\.([0-3])\.0\.weight$", r"classifier.aspp.convs.\1.conv.weight"),
    (r"^classifier\.0\.convs\.([0-3])\.1\.(.+)$", r"classifier.aspp.convs.\1.norm.\2"),
    (r"^classifier\.0\.convs\.4\.1\.weight$", r"classifier.aspp.convs.4.proj.conv.weight"),
    (r"^classifier\.0\.convs\.4\.2\.(.+)$", r"classifier.aspp.convs.4.proj.norm.\1"),
    (r"^classifier\.0\.project\.0\.weight$", r"classifier.aspp.project.conv.weight"),
    (r"^classifier\.0\.project\.1\.(.+)$", r"classifier.aspp.project.norm.\1"),
    (r"^classifier\.1\.weight$", r"classifier.block.conv.weight"),
    (r"^classifier\.2\.(.+)$", r"classifier.block.norm.\1"),
    (r"^classifier\.4\.(weight|bias)$", r"classifier.classifier.\1"),
    (r"^aux_classifier\.0\.weight$", r"aux_classifier.block.conv.weight"),
    (r"^aux_classifier\.1\.(.+)$", r"aux_classifier.block.norm.\1"),
    (r"^aux_classifier\.4\.(weight|bias)$", r"aux_classifier.classifier.\1"),
)


def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``deeplabv3_resnet50`` state_dict -> cnnlab's layout."""
    heads: StateDict = {}
    for key, value in state_dict.items():
        if not key.startswith("backbone."):
            _head_from_torchvision(key, value, heads, DEEPLAB_HEAD_RULES, "deeplabv3_resnet50")
    return {**backbone_from_torchvision(state_dict), **_rename_heads(heads)}


@register_model(DEEPLABV3, task="segmentation", default_input=(3, 513, 513),
                notes="Any registered classifier (backbone='resnet50'), output_stride 8 or 16 (dilated, basic-block "
                      "ResNets too), ASPP rates scaled to the stride ((12, 24, 36) at 8, (6, 12, 18) at 16) unless "
                      "atrous_rates is given, aux_loss (FCN head on the stage before the last).")
def deeplabv3(*, backbone: str = "resnet50", num_classes: int = 21, output_stride: int = 8,
              atrous_rates: Sequence[int] | None = None, aux_loss: bool = False, in_channels: int = 3,
              backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None) -> SimpleSegmentationModel:
    """DeepLabv3 on ``backbone``."""
    return _deeplabv3("deeplabv3", backbone, num_classes=num_classes, output_stride=output_stride,
                      rates=atrous_rates, aux_loss=aux_loss, in_channels=in_channels,
                      backbone_weights=backbone_weights, norm_layer=norm_layer)


@register_model(DEEPLABV3, task="segmentation", default_input=(3, 520, 520),
                converters={"torchvision": from_torchvision}, pretrained={"torchvision": "deeplabv3_resnet50"},
                notes="torchvision's layout: ResNet-50 at output stride 8, ASPP (12, 24, 36), aux head on layer3 "
                      "(aux_loss); 42.0M parameters with aux at 21 classes (torchvision's docs: 42,004,074).")
def deeplabv3_resnet50(*, num_classes: int = 21, aux_loss: bool = False, in_channels: int = 3,
                       backbone_weights: str | os.PathLike | None = None,
                       norm_layer: Any = None) -> SimpleSegmentationModel:
    """torchvision's ``deeplabv3_resnet50``."""
    return _deeplabv3("deeplabv3_resnet50", "resnet50", num_classes=num_classes, output_stride=8, rates=None,
                      aux_loss=aux_loss, in_channels=in_channels, backbone_weights=backbone_weights,
                      norm_layer=norm_layer)


# -- DeepLabv3+ ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeepLabV3PlusConfig:
    """The DeepLabv3+ decoder (Chen et al. 2018, §3.1-3.2); the defaults are smp's ``DeepLabV3Plus``.

    Args:
        decoder_channels: of the ASPP and the decoder convs (256).
        atrous_rates: the ASPP's rates (smp: (12, 24, 36); the paper at output stride 16: (6, 12, 18)).
        aspp_separable: depthwise-separable ASPP branches (the paper's and smp's).
        aspp_dropout: after the ASPP projection (0.5).
        low_level_channels: the 1x1 reduction of the stride-4 map (48, the paper's Table 1 choice).
        low_level_stride: the stride of the encoder map the decoder fuses (4).
        align_corners: of the bilinear up-samplings (smp: True).
    """

    decoder_channels: int = 256
    atrous_rates: tuple[int, ...] = (12, 24, 36)
    aspp_separable: bool = True
    aspp_dropout: float = 0.5
    low_level_channels: int = 48
    low_level_stride: int = 4
    align_corners: bool = True


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest map, then up-sampled, joined with the reduced low-level map, refined.

    Args:
        low_channels, high_channels: of the low-level (stride 4) and deepest encoder maps.
        config: :class:`DeepLabV3PlusConfig`.
    """

    def __init__(self, low_channels: int, high_channels: int, config: DeepLabV3PlusConfig) -> None:
        super().__init__()
        c = config.decoder_channels
        self.align_corners = config.align_corners
        self.aspp = ASPP(high_channels, config.atrous_rates, c, separable=config.aspp_separable,
                         dropout=config.aspp_dropout)
        self.aspp_conv = SeparableConvNormAct(c, c, 3)  # separable in smp whatever aspp_separable says
        self.low_level = ConvNormAct(low_channels, config.low_level_channels, 1)
        self.fuse = SeparableConvNormAct(c + config.low_level_channels, c, 3)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        y = self.aspp_conv(self.aspp(high))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.fuse(torch.cat([y, self.low_level(low)], dim=1))  # (B, c + 48, H/4, W/4) -> (B, c, H/4, W/4)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+: encoder (dilated), decoder on the low-level and deepest maps, 1x1 classifier, bilinear to the input.

    Args:
        encoder: returns ``[low-level map, deepest map]``.
        num_classes: classes with the background.
        config: :class:`DeepLabV3PlusConfig`.
    """

    head_name = "head"

    def __init__(self, encoder: Encoder, num_classes: int, config: DeepLabV3PlusConfig) -> None:
        super().__init__()
        self.encoder, self.config = encoder, config
        self.decoder = DeepLabV3PlusDecoder(encoder.channels[0], encoder.channels[-1], config)
        self.head = nn.Conv2d(config.decoder_channels, num_classes, 1)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    def forward(self, x: Tensor) -> Tensor:
        low, high = self.encoder(x)
        y = self.head(self.decoder(low, high))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=self.config.align_corners)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh 1x1 classifier for ``num_classes``."""
        self.head = nn.Conv2d(self.head.in_channels, num_classes, 1).to(self.head.weight.device)


# smp's DeepLabV3PlusDecoder (Sequential children by index) -> cnnlab's named parts
_SMP_RULES: tuple[tuple[str, str], ...] = (
    (r"^decoder\.aspp\.0\.convs\.(?P<i>[0-3])\.0\.weight$", "decoder.aspp.convs.{i}.conv.weight"),
    (r"^decoder\.aspp\.0\.convs\.(?P<i>[1-3])\.0\.0\.weight$", "decoder.aspp.convs.{i}.conv.depthwise.weight"),
    (r"^decoder\.aspp\.0\.convs\.(?P<i>[1-3])\.0\.1\.weight$", "decoder.aspp.convs.{i}.conv.pointwise.weight"),
    (r"^decoder\.aspp\.0\.convs\.(?P<i>[0-3])\.1\.(?P<x>.+)$", "decoder.aspp.convs.{i}.norm.{x}"),
    (r"^decoder\.aspp\.0\.convs\.4\.1\.weight$", "decoder.aspp.convs.4.proj.conv.weight"),
    (r"^decoder\.aspp\.0\.convs\.4\.2\.(?P<x>.+)$", "decoder.aspp.convs.4.proj.norm.{x}"),
    (r"^decoder\.aspp\.0\.project\.0\.weight$", "decoder.aspp.project.conv.weight"),
    (r"^decoder\.aspp\.0\.project\.1\.(?P<x>.+)$", "decoder.aspp.project.norm.{x}"),
    (r"^decoder\.aspp\.1\.0\.weight$", "decoder.aspp_conv.conv.depthwise.weight"),
    (r"^decoder\.aspp\.1\.1\.weight$", "decoder.aspp_conv.conv.pointwise.weight"),
    (r"^decoder\.aspp\.2\.(?P<x>.+)$", "decoder.aspp_conv.norm.{x}"),
    (r"^decoder\.block1\.0\.weight$", "decoder.low_level.conv.weight"),
    (r"^decoder\.block1\.1\.(?P<x>.+)$", "decoder.low_level.norm.{x}"),
    (r"^decoder\.block2\.0\.0\.weight$", "decoder.fuse.conv.depthwise.weight"),
    (r"^decoder\.block2\.0\.1\.weight$", "decoder.fuse.conv.pointwise.weight"),
    (r"^decoder\.block2\.1\.(?P<x>.+)$", "decoder.fuse.norm.{x}"),
    (r"^segmentation_head\.0\.(?P<x>weight|bias)$", "head.{x}"),
)


def deeplabv3plus_from_smp(state_dict: StateDict) -> StateDict:
    """smp ``DeepLabV3Plus`` (a ResNet encoder) state_dict -> cnnlab's ``deeplabv3plus`` layout."""
    out = encoder_from_smp(state_dict)
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            continue
        for pattern, target in _SMP_RULES:
            if m := re.match(pattern, key):
                out[target.format(**m.groupdict())] = value
                break
        else:
            raise KeyError(f"{key} is not a key of smp's DeepLabV3Plus (without aux_params)")
    return out


_PLUS_FIELDS = tuple(DeepLabV3PlusConfig.__dataclass_fields__)


@register_model(DEEPLABV3PLUS, task="segmentation", default_input=(3, 512, 512),
                converters={"smp": deeplabv3plus_from_smp},
                notes="Any registered classifier (backbone='resnet34'); smp's DeepLabV3Plus defaults: "
                      "output_stride 16, "
                      "separable ASPP with rates (12, 24, 36) (the paper's: (6, 12, 18)), 48-channel low-level "
                      "projection at stride 4, align_corners=True; loads smp's state_dicts (layout 'smp').")
def deeplabv3plus(*, backbone: str = "resnet34", num_classes: int = 21, output_stride: int = 16,
                  in_channels: int = 3, backbone_weights: str | os.PathLike | None = None, norm_layer: Any = None,
                  uniform_dilation: bool = True, **options: Any) -> DeepLabV3Plus:
    """DeepLabv3+ on ``backbone``. ``options``: the fields of :class:`DeepLabV3PlusConfig`.

    ``uniform_dilation`` (smp's): every conv of a dilated stage at the same rate; False: torchvision's.
    """
    name = "deeplabv3plus"
    check_num_classes(num_classes, name)
    bad = sorted(set(options) - set(_PLUS_FIELDS))
    if bad:
        raise CnnlabError(f"{name} does not take the option(s) {bad}; it takes backbone, num_classes, output_stride, "
                          f"in_channels, backbone_weights, norm_layer, uniform_dilation, {', '.join(_PLUS_FIELDS)}")
    if "atrous_rates" in options:
        options["atrous_rates"] = _check_rates(options["atrous_rates"], name)
    config = DeepLabV3PlusConfig(**options)
    if output_stride not in (8, 16):
        raise CnnlabError(f"{name}: output_stride must be 8 or 16 (as Chen et al. 2018 and smp), got {output_stride!r}")
    table = stage_table(backbone, output_stride=output_stride, in_channels=in_channels)
    low = find_stage(backbone, table, config.low_level_stride, model=name)
    if low >= len(table) - 1:
        raise CnnlabError(f"{name} needs a stage deeper than its stride-{config.low_level_stride} low-level stage; "
                          f"backbone {backbone!r} has strides {[f.stride for f in table]}")
    encoder = build_encoder(backbone, output_stride=output_stride, stages=[low, len(table) - 1],
                            weights=backbone_weights, in_channels=in_channels, norm_layer=norm_layer,
                            uniform_dilation=uniform_dilation)
    model = DeepLabV3Plus(encoder, num_classes, config)
    model.model_name = name
    return model
