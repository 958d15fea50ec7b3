"""ShuffleNet v1 (Zhang et al., 2018) and v2 (Ma et al., 2018).

Both: 3x3/2 conv (24 maps), 3x3/2 max pool, three stages of shuffle units (the first of each
at stride 2), global average pooling, a linear classifier. v2 adds a 1x1 conv before pooling.

state_dict layout::

    stem.conv.{conv,norm}.*                     3x3/2 conv + BN (+ ReLU), then stem.pool
    stages.{i}.{j}.branch.conv{1,2,3}.{conv,norm}.*   1x1, 3x3 depthwise, 1x1 (see layers/shuffle.py)
    stages.{i}.0.shortcut.conv{1,2}.{conv,norm}.*     v2 stride-2 units only (v1's is an average pool)
    conv_last.{conv,norm}.*                     v2 only: the 1x1 conv5
    fc.*
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, get_act_layer, get_norm_layer, init_weights, make_divisible
from cnnlab.layers.init import kaiming_init, pytorch_default_init
from cnnlab.layers.shuffle import ShuffleUnitV1, ShuffleUnitV2
from cnnlab.models._convert import replace_prefix
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

# Both papers: stages 2-4 have 1 + 3, 1 + 7, 1 + 3 units (the first at stride 2).
STAGE_UNITS = (4, 8, 4)


@dataclass(frozen=True)
class ShuffleNetV1Column:
    """One column of Zhang et al. 2018, Table 1: output channels of stages 2-4 for ``groups``."""

    groups: int
    stage_channels: tuple[int, int, int]
    mflops: int  # the table's "Complexity" at 224x224 (multiply-adds), for ShuffleNet 1x


# Zhang et al. 2018, Table 1 (bottleneck width = 1/4 of the output channels, §3.3).
SHUFFLENET_V1_TABLE1 = (
    ShuffleNetV1Column(1, (144, 288, 576), 143),
    ShuffleNetV1Column(2, (200, 400, 800), 140),
    ShuffleNetV1Column(3, (240, 480, 960), 137),
    ShuffleNetV1Column(4, (272, 544, 1088), 133),
    ShuffleNetV1Column(8, (384, 768, 1536), 137),
)


@dataclass(frozen=True)
class ShuffleNetV2Column:
    """One column of Ma et al. 2018, Table 5: output channels of stages 2-4 and of conv5."""

    stage_channels: tuple[int, int, int]
    last_channels: int
    mflops: int  # the table's FLOPs (multiply-adds) at 224x224


# Ma et al. 2018, Table 5 (0.5x, 1x, 1.5x, 2x).
SHUFFLENET_V2_X0_5 = ShuffleNetV2Column((48, 96, 192), 1024, 41)
SHUFFLENET_V2_X1_0 = ShuffleNetV2Column((116, 232, 464), 1024, 146)
SHUFFLENET_V2_X1_5 = ShuffleNetV2Column((176, 352, 704), 1024, 299)
SHUFFLENET_V2_X2_0 = ShuffleNetV2Column((244, 488, 976), 2048, 591)


def _stem(in_channels: int, channels: int, norm_layer, act_layer) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=ConvNormAct(in_channels, channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer),
        pool=nn.MaxPool2d(3, stride=2, padding=1),
    ))


class _ShuffleNetBase(Classifier):
    """What v1 and v2 share: stem -> stages -> conv_last (v2 only) -> global average pool -> fc."""

    head_name = "fc"
    min_input_size = 32

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))  # global average pool: (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(x)

    def _build_head(self, channels: int, num_classes: int, drop_rate: float) -> None:
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = channels


class ShuffleNetV1(_ShuffleNetBase):
    """ShuffleNet v1 ("ShuffleNet s x, g = groups") read from Table 1.

    Args:
        groups: groups of the 1x1 convs, one of Table 1's columns (1, 2, 3, 4, 8).
        width_mult: ``s``, scales every layer's channels (ShuffleNet 0.5x, 1x, 2x, ...). Stage
            widths are rounded to a multiple of ``4 * groups`` (the bottleneck, 1/4 of a stage's
            width, must split into groups), the stem's to a multiple of ``groups``. This gives
            the authors' released widths at 0.5x and 2x; at 1.5x they keep a 24-map stem (we: 36).
        drop_rate: dropout before the classifier (none in the paper).
        norm_layer, act_layer: factories or names.
        init: ``"reference"`` = ``"kaiming"`` (no library has ShuffleNet v1 and its paper states no scheme,
            so He et al. 2015 as for the ResNets it compares with), ``"xavier"`` or ``"none"``.
    """

    def __init__(
        self,
        *,
        groups: int = 3,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | str = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] | str = nn.ReLU,
        init: str = "reference",
    ) -> None:
        super().__init__()
        columns = {c.groups: c for c in SHUFFLENET_V1_TABLE1}
        if groups not in columns:
            raise CnnlabError(f"ShuffleNet v1 groups must be one of Table 1's {sorted(columns)}, got {groups}")
        if width_mult <= 0:
            raise CnnlabError(f"width_mult must be positive, got {width_mult}")
        self.num_classes, self.in_channels = num_classes, in_channels
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        stem_channels = make_divisible(24 * width_mult, groups)
        self.stem = _stem(in_channels, stem_channels, norm_layer, act_layer)
        self.feature_info += [FeatureInfo("stem.conv", stem_channels, 2), FeatureInfo("stem", stem_channels, 4)]

        channels, stride, stages = stem_channels, 4, []
        for i, (width, num_units) in enumerate(zip(columns[groups].stage_channels, STAGE_UNITS)):
            out_channels = make_divisible(width * width_mult, 4 * groups)
            units = []
            for j in range(num_units):
                units.append(ShuffleUnitV1(
                    channels, out_channels, stride=2 if j == 0 else 1, groups=groups,
                    first_grouped=not (i == 0 and j == 0),  # §3.3: stage 2's first 1x1 conv is not grouped
                    norm_layer=norm_layer, act_layer=act_layer,
                ))
                channels = out_channels
            stride *= 2
            stages.append(nn.Sequential(*units))
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*stages)
        self.conv_last = nn.Identity()  # v1 pools stage 4 directly
        self._build_head(channels, num_classes, drop_rate)
        init_weights(self, init, kaiming_init)


class ShuffleNetV2(_ShuffleNetBase):
    """ShuffleNet v2 read from a column of Table 5.

    Args:
        config: stage widths and the width of conv5.
        drop_rate: dropout before the classifier (none in the paper).
        norm_layer, act_layer: factories or names.
        init: ``"reference"`` (torchvision's, which keeps PyTorch's layer defaults), ``"kaiming"``,
            ``"xavier"`` or ``"none"``.
    """

    def __init__(
        self,
        config: ShuffleNetV2Column = SHUFFLENET_V2_X1_0,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | str = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] | str = nn.ReLU,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        self.stem = _stem(in_channels, 24, norm_layer, act_layer)
        self.feature_info += [FeatureInfo("stem.conv", 24, 2), FeatureInfo("stem", 24, 4)]
        channels, stride, stages = 24, 4, []
        for i, (out_channels, num_units) in enumerate(zip(config.stage_channels, STAGE_UNITS)):
            units = []
            for j in range(num_units):
                units.append(ShuffleUnitV2(channels, out_channels, 2 if j == 0 else 1, norm_layer, act_layer))
                channels = out_channels
            stride *= 2
            stages.append(nn.Sequential(*units))
            if i < len(config.stage_channels) - 1:
                self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*stages)
        self.conv_last = ConvNormAct(channels, config.last_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.feature_info.append(FeatureInfo("conv_last", config.last_channels, stride))  # stage 4 read after conv5
        self._build_head(config.last_channels, num_classes, drop_rate)
        init_weights(self, init, pytorch_default_init)


# -- torchvision checkpoints (v2) ------------------------------------------------------------

_TV_UNIT = re.compile(r"^stage(\d)\.(\d+)\.branch([12])\.(\d)\.(.+)$")
# torchvision's Sequential indices -> our children (ReLUs hold no weights)
_TV_BRANCH1 = {"0": "conv1.conv", "1": "conv1.norm", "2": "conv2.conv", "3": "conv2.norm"}
_TV_BRANCH2 = {"0": "conv1.conv", "1": "conv1.norm", "3": "conv2.conv", "4": "conv2.norm", "5": "conv3.conv", "6": "conv3.norm"}
_TV_FIXED = {"conv1.0.": "stem.conv.conv.", "conv1.1.": "stem.conv.norm.", "conv5.0.": "conv_last.conv.",
             "conv5.1.": "conv_last.norm.", "fc.": "fc."}


def convert_torchvision_v2(state_dict: StateDict) -> StateDict:
    """torchvision ``ShuffleNetV2`` state_dict -> cnnlab layout."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if m := _TV_UNIT.match(key):
            stage, unit, branch, index, rest = m.groups()
            part = "shortcut." + _TV_BRANCH1[index] if branch == "1" else "branch." + _TV_BRANCH2[index]
            new = f"stages.{int(stage) - 2}.{unit}.{part}.{rest}"
        else:
            new = replace_prefix(key, _TV_FIXED, "torchvision ShuffleNetV2")
        out[new] = value
    return out


SHUFFLENET_V1 = Family(
    name="ShuffleNet v1",
    paper="Zhang, Zhou, Lin, Sun: ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices (CVPR 2018)",
    year=2018,
    url="https://arxiv.org/abs/1707.01083",
)
SHUFFLENET_V2 = Family(
    name="ShuffleNet v2",
    paper="Ma, Zhang, Zheng, Sun: ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design (ECCV 2018)",
    year=2018,
    url="https://arxiv.org/abs/1807.11164",
    converters={"torchvision": convert_torchvision_v2},
)


def _shufflenet_v1(groups: int, kwargs: dict) -> ShuffleNetV1:
    overwrite_param(kwargs, "groups", groups)  # the variant is its group count; ShuffleNetV1(groups=...) for others
    return ShuffleNetV1(**kwargs)


@register_model(SHUFFLENET_V1, notes="ShuffleNet 1x, g=1 (Table 1): 143 MFLOPs.")
def shufflenet_v1_g1(**kwargs) -> ShuffleNetV1:
    return _shufflenet_v1(1, kwargs)


@register_model(SHUFFLENET_V1, notes="ShuffleNet 1x, g=2 (Table 1): 140 MFLOPs.")
def shufflenet_v1_g2(**kwargs) -> ShuffleNetV1:
    return _shufflenet_v1(2, kwargs)


@register_model(SHUFFLENET_V1, notes="ShuffleNet 1x, g=3 (Table 1): 137 MFLOPs, 1.9M parameters (megvii's release).")
def shufflenet_v1_g3(**kwargs) -> ShuffleNetV1:
    return _shufflenet_v1(3, kwargs)


@register_model(SHUFFLENET_V1, notes="ShuffleNet 1x, g=4 (Table 1): 133 MFLOPs.")
def shufflenet_v1_g4(**kwargs) -> ShuffleNetV1:
    return _shufflenet_v1(4, kwargs)


@register_model(SHUFFLENET_V1, notes="ShuffleNet 1x, g=8 (Table 1): 137 MFLOPs, 2.4M parameters (megvii's release).")
def shufflenet_v1_g8(**kwargs) -> ShuffleNetV1:
    return _shufflenet_v1(8, kwargs)


@register_model(SHUFFLENET_V2, pretrained={"torchvision": "shufflenet_v2_x0_5"}, notes="Table 5, 0.5x: 41 MFLOPs, 1.4M parameters.")
def shufflenet_v2_x0_5(**kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(SHUFFLENET_V2_X0_5, **kwargs)


@register_model(SHUFFLENET_V2, pretrained={"torchvision": "shufflenet_v2_x1_0"}, notes="Table 5, 1x: 146 MFLOPs, 2.3M parameters.")
def shufflenet_v2_x1_0(**kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(SHUFFLENET_V2_X1_0, **kwargs)


@register_model(SHUFFLENET_V2, pretrained={"torchvision": "shufflenet_v2_x1_5"}, notes="Table 5, 1.5x: 299 MFLOPs, 3.5M parameters.")
def shufflenet_v2_x1_5(**kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(SHUFFLENET_V2_X1_5, **kwargs)


@register_model(SHUFFLENET_V2, pretrained={"torchvision": "shufflenet_v2_x2_0"}, notes="Table 5, 2x: 591 MFLOPs, 7.4M parameters.")
def shufflenet_v2_x2_0(**kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(SHUFFLENET_V2_X2_0, **kwargs)
