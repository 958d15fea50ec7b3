"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018).

v1 stacks depthwise separable convolutions; v2 stacks inverted residuals (MBConv). The
generic inverted-residual network here, ``MBConvNet``, is also what EfficientNet and MnasNet
build from their own tables (see ``efficientnet.py``, ``mnasnet.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, SqueezeExcite, get_act_layer, init_weights, make_divisible
from cnnlab.layers.conv import LayerFactory
from cnnlab.layers.init import kaiming_init, tf_mobile_init
from cnnlab.layers.mbconv import DepthwiseSeparableBlock, MBConv
from cnnlab.models._convert import rename_keys
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

# ----------------------------------------------------------------------------------------------
# MobileNet v1
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeparableStage:
    """``repeats`` depthwise separable blocks to ``out_channels``; the first has ``stride``."""

    out_channels: int
    stride: int
    repeats: int


# Howard et al. 2017, Table 1, after the stem "Conv / s2, 3x3x3x32", grouped by resolution
# (as timm groups it). The table's last "Conv dw / s2" on a 7x7 map is a typo for s1: its
# output is still 7x7, and the authors' TF-slim code uses stride 1 there.
MOBILENET_V1_STAGES = (
    SeparableStage(64, 1, 1),  # 112x112
    SeparableStage(128, 2, 2),  # 56x56
    SeparableStage(256, 2, 2),  # 28x28
    SeparableStage(512, 2, 6),  # 14x14: the "5x" block plus the stride-2 one before it
    SeparableStage(1024, 2, 2),  # 7x7
)


def _feature_info_by_stride(stages: Sequence[tuple[str, int, int]]) -> list[FeatureInfo]:
    """The last (module, channels, stride) at each stride, i.e. the deepest map of each resolution."""
    last: dict[int, FeatureInfo] = {}
    for module, channels, stride in stages:
        last[stride] = FeatureInfo(module, channels, stride)
    return [last[s] for s in sorted(last)]


class _MobileClassifier(Classifier):
    """Shared head: global average pool -> dropout -> linear ``fc`` (``num_classes=0``: no fc)."""

    head_name = "fc"

    def _build_head(self, features: int, num_classes: int, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(self.drop(x))


class MobileNetV1(_MobileClassifier):
    """MobileNet v1: a 3x3 stem conv, then depthwise separable blocks, average pool, linear.

    Args:
        stages: the table (``MOBILENET_V1_STAGES``).
        width_mult: the paper's width multiplier alpha (0.25, 0.5, 0.75, 1.0): every layer's
            channels times alpha, rounded to a multiple of 8 (as timm and TF-slim do).
        stem_channels: channels of the stem conv before scaling (32).
        num_classes, in_channels: classifier outputs and input channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: must be 0: v1 has no residual branch that stochastic depth could drop.
        norm_layer, act_layer: factories or names. ReLU6 by default: the paper's text says
            ReLU, but its authors' TF-slim code (and timm's weights) use ReLU6.
        init: ``"reference"`` (timm's, the TF code's: see ``tf_mobile_init``), ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    def __init__(
        self,
        *,
        stages: Sequence[SeparableStage] = MOBILENET_V1_STAGES,
        width_mult: float = 1.0,
        stem_channels: int = 32,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory | str = nn.ReLU6,
        init: str = "reference",
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise CnnlabError(f"width_mult must be > 0, got {width_mult}")
        if not 0.0 <= drop_rate < 1.0:
            raise CnnlabError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if drop_path_rate:
            raise CnnlabError("MobileNet v1 has no residual connections, so drop_path_rate must be 0 "
                              f"(got {drop_path_rate}); use drop_rate for dropout before the classifier")
        act_layer = get_act_layer(act_layer)
        self.in_channels = in_channels
        channels = make_divisible(stem_channels * width_mult, 8)
        self.stem = ConvNormAct(in_channels, channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        stride, taps, layers = 2, [], []
        for i, stage in enumerate(stages):
            out_channels = make_divisible(stage.out_channels * width_mult, 8)
            blocks = []
            for j in range(stage.repeats):
                blocks.append(DepthwiseSeparableBlock(channels, out_channels, 3, stage.stride if j == 0 else 1,
                                                      norm_layer=norm_layer, act_layer=act_layer))
                channels = out_channels
            stride *= stage.stride
            layers.append(nn.Sequential(*blocks))
            taps.append((f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*layers)
        self.feature_info = _feature_info_by_stride(taps)
        self._build_head(channels, num_classes, drop_rate)
        init_weights(self, init, tf_mobile_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


# ----------------------------------------------------------------------------------------------
# The inverted-residual network: MobileNet v2, and with other tables MnasNet and EfficientNet
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MBConvStage:
    """One row of an inverted-residual table: ``repeats`` MBConv blocks, the first with ``stride``.

    Field names follow MobileNet v2's Table 2 (t, c, n, s) plus the kernel and the SE ratio
    that MnasNet and EfficientNet add (``se_ratio``: SE bottleneck / block input; 0 = no SE).
    """

    expand_ratio: float  # t
    kernel_size: int  # k
    stride: int  # s
    out_channels: int  # c
    repeats: int  # n
    se_ratio: float = 0.0


def scale_stages(
    stages: Sequence[MBConvStage], width_mult: float = 1.0, depth_mult: float = 1.0, divisor: int = 8
) -> tuple[MBConvStage, ...]:
    """Scale a table: channels ``make_divisible(c * width, 8)``, repeats ``ceil(n * depth)``.

    The rounding of MobileNet v2/MnasNet (width) and EfficientNet (width and depth).
    """
    return tuple(
        replace(s, out_channels=make_divisible(s.out_channels * width_mult, divisor),
                repeats=int(math.ceil(s.repeats * depth_mult)))
        for s in stages
    )


class MBConvNet(_MobileClassifier):
    """Stem conv, stages of MBConv blocks, 1x1 head conv, average pool, dropout, linear.

    Args:
        stages: the (already scaled) table, one ``MBConvStage`` per row.
        stem_channels: output channels of the 3x3 stride-2 stem.
        head_channels: output channels of the final 1x1 conv (1280 in all three papers).
        num_classes, in_channels: classifier outputs and input channels.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, growing linearly with depth: block ``i`` (from 0) of
            ``N`` drops its residual branch with ``drop_path_rate * i / N`` (torchvision's and timm's rule).
        norm_layer, act_layer: factories (or names for the activation).
        attn_layer: attention for rows with ``se_ratio > 0`` (default: SqueezeExcite with ``act_layer``).
        init: ``"reference"`` (the subclass's ``reference_init``), ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    reference_init = staticmethod(kaiming_init)

    def __init__(
        self,
        *,
        stages: Sequence[MBConvStage],
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory | str = nn.ReLU6,
        attn_layer: Callable[..., nn.Module] | None = None,
        init: str = "reference",
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise CnnlabError(f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate} and {drop_path_rate}")
        act_layer = get_act_layer(act_layer)
        if attn_layer is None:
            attn_layer = partial(SqueezeExcite, act_layer=act_layer)
        self.in_channels = in_channels
        self.stem = ConvNormAct(in_channels, stem_channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        channels, stride, taps, layers = stem_channels, 2, [], []
        total, index = sum(s.repeats for s in stages), 0
        for i, stage in enumerate(stages):
            blocks = []
            for j in range(stage.repeats):
                blocks.append(MBConv(
                    channels, stage.out_channels, stage.kernel_size, stage.stride if j == 0 else 1,
                    expand_ratio=stage.expand_ratio, norm_layer=norm_layer, act_layer=act_layer,
                    attn_layer=attn_layer if stage.se_ratio > 0 else None, attn_ratio=stage.se_ratio,
                    drop_path=drop_path_rate * index / total,
                ))
                channels, index = stage.out_channels, index + 1
            stride *= stage.stride
            layers.append(nn.Sequential(*blocks))
            taps.append((f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*layers)
        self.conv_head = ConvNormAct(channels, head_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        taps.append(("conv_head", head_channels, stride))  # forward_features ends here
        self.feature_info = _feature_info_by_stride(taps)
        self._build_head(head_channels, num_classes, drop_rate)
        init_weights(self, init, self.reference_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.stem(x)))


class MobileNetV2(MBConvNet):
    """MobileNet v2: ``MBConvNet`` with ReLU6 and the Table 2 rows (Args: as ``MBConvNet``)."""

    reference_init = staticmethod(kaiming_init)  # torchvision's MobileNetV2


# Sandler et al. 2018, Table 2: t, k, s, c, n (the paper's column order is t, c, n, s).
MOBILENET_V2_STAGES = (
    MBConvStage(1, 3, 1, 16, 1),
    MBConvStage(6, 3, 2, 24, 2),
    MBConvStage(6, 3, 2, 32, 3),
    MBConvStage(6, 3, 2, 64, 4),
    MBConvStage(6, 3, 1, 96, 3),
    MBConvStage(6, 3, 2, 160, 3),
    MBConvStage(6, 3, 1, 320, 1),
)

# ----------------------------------------------------------------------------------------------
# Converters: torchvision / timm state_dicts -> cnnlab
# ----------------------------------------------------------------------------------------------


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def convert_timm_mobilenetv1(state_dict: StateDict) -> StateDict:
    """timm ``mobilenetv1_*`` (its EfficientNet class with depthwise separable blocks) -> cnnlab."""
    return rename_keys(state_dict, [
        (r"conv_stem\.weight", r"stem.conv.weight"),
        (rf"bn1\.{_BN}", r"stem.norm.\1"),
        (r"blocks\.(\d+)\.(\d+)\.conv_dw\.weight", r"stages.\1.\2.dw.conv.weight"),
        (rf"blocks\.(\d+)\.(\d+)\.bn1\.{_BN}", r"stages.\1.\2.dw.norm.\3"),
        (r"blocks\.(\d+)\.(\d+)\.conv_pw\.weight", r"stages.\1.\2.pw.conv.weight"),
        (rf"blocks\.(\d+)\.(\d+)\.bn2\.{_BN}", r"stages.\1.\2.pw.norm.\3"),
        (r"classifier\.(weight|bias)", r"fc.\1"),
    ])


def convert_timm_mbconvnet(state_dict: StateDict) -> StateDict:
    """timm's ``EfficientNet`` class -> MBConvNet (``mobilenetv2_*``, ``efficientnet_b*``, ``[se]mnasnet_*``).

    timm's first block is a ``DepthwiseSeparableConv`` (conv_dw/bn1, se, conv_pw/bn2), the others
    ``InvertedResidual`` (conv_pw/bn1, conv_dw/bn2, se, conv_pwl/bn3).
    """
    separable = {"conv_dw": "dw.conv", "bn1": "dw.norm", "conv_pw": "project.conv", "bn2": "project.norm"}
    inverted = {"conv_pw": "expand.conv", "bn1": "expand.norm", "conv_dw": "dw.conv", "bn2": "dw.norm",
                "conv_pwl": "project.conv", "bn3": "project.norm"}
    se = {"conv_reduce": "attn.fc1", "conv_expand": "attn.fc2"}
    out, rest = {}, {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "blocks":  # blocks.{stage}.{block}.{layer}.{param}
            prefix = ".".join(parts[:3])
            layers = inverted if f"{prefix}.conv_pwl.weight" in state_dict else separable
            layer = se[parts[4]] if parts[3] == "se" else layers[parts[3]]
            out[".".join(["stages", parts[1], parts[2], layer, *parts[-1:]])] = value
        else:
            rest[key] = value
    out.update(rename_keys(rest, [
        (r"conv_stem\.weight", "stem.conv.weight"),
        (rf"bn1\.{_BN}", r"stem.norm.\1"),
        (r"conv_head\.weight", "conv_head.conv.weight"),
        (rf"bn2\.{_BN}", r"conv_head.norm.\1"),
        (r"classifier\.(weight|bias)", r"fc.\1"),
    ]))
    return out


# torchvision's Conv2dNormActivation names its conv and norm "0" and "1"; ConvNormAct "conv" and "norm".
TORCHVISION_CNA = {"0": "conv", "1": "norm"}


def torchvision_stem_head_rules(last: int) -> list[tuple[str, str]]:
    """``rename_keys`` rules for torchvision's ``features.0`` stem, ``features.{last}`` head conv and classifier."""
    return [
        (r"features\.0\.0\.weight", "stem.conv.weight"),
        (r"features\.0\.1\.(.*)", r"stem.norm.\1"),
        (rf"features\.{last}\.0\.weight", "conv_head.conv.weight"),
        (rf"features\.{last}\.1\.(.*)", r"conv_head.norm.\1"),
        (r"classifier\.1\.(weight|bias)", r"fc.\1"),
    ]


def convert_torchvision_mobilenet_v2(state_dict: StateDict) -> StateDict:
    """torchvision ``mobilenet_v2`` (a flat ``features`` list) -> cnnlab (blocks grouped by table row)."""
    where = [(s, b) for s, stage in enumerate(MOBILENET_V2_STAGES) for b in range(stage.repeats)]  # features.{i+1}
    out, rest = {}, {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[2:3] == ["conv"]:  # features.{i}.conv.{layer}...
            s, b = where[int(parts[1]) - 1]
            # conv.0-3: expand CNA, depthwise CNA, project Conv2d, project BN; with t=1 no expand
            names = ["expand", "dw", "project.conv", "project.norm"]
            if f"features.{parts[1]}.conv.3.weight" not in state_dict:
                names = names[1:]
            name = names[int(parts[3])]
            tail = parts[4:] if name.startswith("project") else [TORCHVISION_CNA[parts[4]], *parts[5:]]
            out[".".join(["stages", str(s), str(b), name, *tail])] = value
        else:
            rest[key] = value
    out.update(rename_keys(rest, torchvision_stem_head_rules(last=len(where) + 1)))
    return out


# ----------------------------------------------------------------------------------------------
# Registered variants
# ----------------------------------------------------------------------------------------------

MOBILENET_V1 = Family(
    name="MobileNet v1",
    paper="Howard et al., MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
    year=2017,
    url="https://arxiv.org/abs/1704.04861",
    converters={"timm": convert_timm_mobilenetv1},
)
MOBILENET_V2 = Family(
    name="MobileNet v2",
    paper="Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    year=2018,
    url="https://arxiv.org/abs/1801.04381",
    converters={"torchvision": convert_torchvision_mobilenet_v2, "timm": convert_timm_mbconvnet},
)


def _mobilenet_v1(width: float, **kwargs) -> MobileNetV1:
    overwrite_param(kwargs, "width_mult", width)  # the name fixes the width; MobileNetV1(width_mult=...) for others
    return MobileNetV1(**kwargs)


# Paper parameter counts: Howard et al. 2017, Table 6 (width multipliers at 224x224).
@register_model(MOBILENET_V1, pretrained={"timm": "mobilenetv1_100"}, notes="paper (Table 6): 4.2M parameters")
def mobilenetv1_100(**kwargs) -> MobileNetV1:
    return _mobilenet_v1(1.0, **kwargs)


@register_model(MOBILENET_V1, pretrained={"timm": "mobilenetv1_125"},
                notes="width 1.25 (timm's variant; not in the paper)")
def mobilenetv1_125(**kwargs) -> MobileNetV1:
    return _mobilenet_v1(1.25, **kwargs)


@register_model(MOBILENET_V1, notes="paper (Table 6): 2.6M parameters")
def mobilenetv1_075(**kwargs) -> MobileNetV1:
    return _mobilenet_v1(0.75, **kwargs)


@register_model(MOBILENET_V1, notes="paper (Table 6): 1.3M parameters")
def mobilenetv1_050(**kwargs) -> MobileNetV1:
    return _mobilenet_v1(0.5, **kwargs)


@register_model(MOBILENET_V1, notes="paper (Table 6): 0.5M parameters")
def mobilenetv1_025(**kwargs) -> MobileNetV1:
    return _mobilenet_v1(0.25, **kwargs)


@register_model(MOBILENET_V2, pretrained={"torchvision": "mobilenet_v2", "timm": "mobilenetv2_100"},
                notes="paper (Table 4): 3.4M parameters, 300M multiply-adds; ReLU6, width_mult option")
def mobilenet_v2(*, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    if width_mult <= 0:
        raise CnnlabError(f"width_mult must be > 0, got {width_mult}")
    kwargs.setdefault("stages", scale_stages(MOBILENET_V2_STAGES, width_mult))
    kwargs.setdefault("stem_channels", make_divisible(32 * width_mult, 8))
    # The head is never narrowed below 1280 (Sandler et al. 2018, Sec. 6.1: "except the last layer").
    kwargs.setdefault("head_channels", make_divisible(1280 * max(1.0, width_mult), 8))
    return MobileNetV2(**kwargs)
