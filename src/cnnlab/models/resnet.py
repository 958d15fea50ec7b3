"""ResNet (He et al. 2016) and the families built on its blocks: ResNeXt, Wide ResNet-50/101, SE-ResNet(X)t.

One generic :class:`ResNet` reads a stage table (He et al. 2016, Table 1). ResNeXt is
the bottleneck with a grouped 3x3 conv (``groups``, ``base_width``), Wide ResNet-50-2 the
bottleneck with twice the inner width (``base_width=128``), SE-ResNet the same network with
``attn_layer=SqueezeExcite`` plugged into every block.

state_dict keys (torchvision names in brackets; ``cnnlab.load_weights`` converts them)::

    stem.conv.weight, stem.norm.*                                 [conv1, bn1]
    layer{1..4}.{i}.residual.conv{j}.conv.weight                  [layerN.i.conv{j}.weight]
    layer{1..4}.{i}.residual.conv{j}.norm.*                       [layerN.i.bn{j}.*]
    layer{1..4}.{i}.residual.attn.fc{1,2}.{weight,bias}           [timm: layerN.i.se.fc{1,2}.*]
    layer{1..4}.{i}.shortcut.conv.weight, .shortcut.norm.*        [layerN.i.downsample.{0,1}.*]
    fc.weight, fc.bias                                            [fc]
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, SqueezeExcite, get_act_layer, get_norm_layer, init_weights, zero_init_last_norm
from cnnlab.layers.init import torchvision_resnet_init
from cnnlab.layers.residual import BasicBlock, Bottleneck
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

LayerFactory = Callable[..., nn.Module]
BlockType = type[BasicBlock] | type[Bottleneck]


# -- checkpoint converters -------------------------------------------------------------------------
_RENAMES = (
    (re.compile(r"^conv1\.(.+)$"), r"stem.conv.\1"),
    (re.compile(r"^bn1\.(.+)$"), r"stem.norm.\1"),
    (re.compile(r"^(layer\d\.\d+)\.conv(\d)\.(.+)$"), r"\1.residual.conv\2.conv.\3"),
    (re.compile(r"^(layer\d\.\d+)\.bn(\d)\.(.+)$"), r"\1.residual.conv\2.norm.\3"),
    (re.compile(r"^(layer\d\.\d+)\.downsample\.0\.(.+)$"), r"\1.shortcut.conv.\2"),
    (re.compile(r"^(layer\d\.\d+)\.downsample\.1\.(.+)$"), r"\1.shortcut.norm.\2"),
    (re.compile(r"^(layer\d\.\d+)\.se\.(fc[12]\..+)$"), r"\1.residual.attn.\2"),
    (re.compile(r"^(fc\..+)$"), r"\1"),
)


def _rename(state_dict: StateDict, allow_se: bool) -> StateDict:
    out: StateDict = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                if ".se." in key and not allow_se:
                    raise KeyError(f"{key}: torchvision ResNets have no squeeze-excite layers")
                out[pattern.sub(repl, key)] = value
                break
        else:
            raise KeyError(f"{key} is not a key of a torchvision/timm ResNet")
    return out


def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ResNet / ResNeXt / Wide ResNet state_dict -> cnnlab's layout."""
    return _rename(state_dict, allow_se=False)


def from_timm(state_dict: StateDict) -> StateDict:
    """timm ResNet-family state_dict (resnet50, seresnet50, seresnext50_32x4d, ...) -> cnnlab's layout."""
    return _rename(state_dict, allow_se=True)


CONVERTERS = {"torchvision": from_torchvision, "timm": from_timm}
RESNET = Family("ResNet", "He et al., Deep Residual Learning for Image Recognition (CVPR 2016)", 2016,
                "https://arxiv.org/abs/1512.03385", CONVERTERS)
RESNEXT = Family("ResNeXt", "Xie et al., Aggregated Residual Transformations for Deep Neural Networks (CVPR 2017)",
                 2017, "https://arxiv.org/abs/1611.05431", CONVERTERS)
WIDE_RESNET = Family("Wide ResNet", "Zagoruyko & Komodakis, Wide Residual Networks (BMVC 2016)", 2016,
                     "https://arxiv.org/abs/1605.07146", CONVERTERS)
SENET = Family("SENet", "Hu et al., Squeeze-and-Excitation Networks (CVPR 2018)", 2018,
               "https://arxiv.org/abs/1709.01507", CONVERTERS)


# -- the architecture table -------------------------------------------------------------------------
@dataclass(frozen=True)
class ResNetStage:
    """One row of He et al. 2016, Table 1: conv2_x .. conv5_x.

    ``channels`` is the stage's base width (64/128/256/512); its blocks output
    ``channels * block.expansion`` maps. ``stride`` is the first block's.
    """

    num_blocks: int
    channels: int
    stride: int


def resnet_stages(*num_blocks: int) -> tuple[ResNetStage, ...]:
    """Table 1's four stages with the given block counts: 64/128/256/512 maps, strides 1, 2, 2, 2."""
    if len(num_blocks) != 4:
        raise CnnlabError(f"a ResNet has 4 stages, got block counts {num_blocks}")
    return tuple(ResNetStage(n, c, s) for n, c, s in zip(num_blocks, (64, 128, 256, 512), (1, 2, 2, 2)))


# Table 1, by depth. ResNet-34: 3, 4, 6, 3 residual units of 64/128/256/512 maps.
RESNET18 = resnet_stages(2, 2, 2, 2)
RESNET34 = resnet_stages(3, 4, 6, 3)
RESNET50 = resnet_stages(3, 4, 6, 3)  # same counts as 34, with bottleneck blocks
RESNET101 = resnet_stages(3, 4, 23, 3)
RESNET152 = resnet_stages(3, 8, 36, 3)


class ResNet(Classifier):
    """ResNet: a 7x7/2 conv and 3x3/2 max pool stem, four residual stages, global pooling, FC.

    Args:
        block: ``BasicBlock`` (18/34) or ``Bottleneck`` (50+, ResNeXt, Wide).
        stages: the stage table (``ResNetStage`` rows).
        num_classes, in_channels: classifier outputs and input channels.
        groups, base_width: the bottleneck's 3x3 conv: cardinality and width per group.
        attn_layer: attention factory plugged into every block (e.g. ``SqueezeExcite``), or None.
        output_stride: 32, 16 or 8; below 32 the last stages dilate instead of striding (DeepLab).
        norm_layer, act_layer: factories or names (``"batchnorm"``, ``"groupnorm"``; ``"relu"``, ``"silu"``).
        zero_init_residual: zero each block's last norm so it starts as the identity (Goyal et al. 2017);
            on by default for the SE variants, as in timm (their reference).
        init: ``"reference"`` (torchvision's and timm's: He normal fan_out convs, PyTorch's default linear),
            ``"kaiming"`` (the same convs, N(0, 0.01) linear), ``"xavier"`` or ``"none"``.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block; earlier blocks get linearly less (Huang et al. 2016).
    """

    head_name = "fc"
    min_input_size = 32

    def __init__(
        self,
        *,
        block: BlockType = Bottleneck,
        stages: tuple[ResNetStage, ...] = RESNET50,
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: int = 1,
        base_width: int = 64,
        attn_layer: LayerFactory | None = None,
        output_stride: int = 32,
        norm_layer: LayerFactory | str = nn.BatchNorm2d,
        act_layer: LayerFactory | str = nn.ReLU,
        zero_init_residual: bool = False,
        init: str = "reference",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(stages) != 4:
            raise CnnlabError(f"a ResNet has 4 stages (He et al. 2016, Table 1), got {len(stages)} stage rows")
        if output_stride not in (8, 16, 32):
            raise CnnlabError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
            raise CnnlabError(f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, {drop_path_rate}")
        norm_layer = get_norm_layer(norm_layer)
        act_layer = get_act_layer(act_layer)
        self.num_classes, self.in_channels = num_classes, in_channels

        self.stem = ConvNormAct(in_channels, 64, 7, 2, norm_layer=norm_layer, act_layer=act_layer)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.feature_info.append(FeatureInfo("stem", 64, 2))

        channels, stride, dilation = 64, 4, 1
        total_blocks, block_index = sum(s.num_blocks for s in stages), 0
        for i, stage in enumerate(stages):
            first_dilation, stage_stride = dilation, stage.stride
            if stride * stage.stride > output_stride:  # keep the resolution, widen the receptive field
                dilation *= stage.stride
                stage_stride = 1
            stride *= stage_stride
            out_channels = stage.channels * block.expansion
            blocks = []
            for j in range(stage.num_blocks):
                blocks.append(block(
                    channels, out_channels, stage_stride if j == 0 else 1,
                    groups=groups, base_width=base_width,
                    dilation=dilation, first_dilation=first_dilation if j == 0 else dilation,
                    norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer,
                    drop_path=drop_path_rate * block_index / max(total_blocks - 1, 1),
                ))
                channels, block_index = out_channels, block_index + 1
            # torchvision's names layer1..layer4 (keeps checkpoints and backbone code familiar)
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"layer{i + 1}", channels, stride))
        self.num_features = channels

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init, torchvision_resnet_init)
        if zero_init_residual:
            zero_init_last_norm(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))  # (B, C, H, W) -> (B, 64, H/4, W/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (B, 64, H/4, W/4) -> (B, 512 * expansion, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # (B, C, h, w) -> (B, C)
        return x if pre_logits else self.fc(x)


def _build(block: BlockType, stages: tuple[ResNetStage, ...], kwargs: dict, **forced) -> ResNet:
    """The family builder: force the variant's values (a conflicting caller value raises), then build."""
    for name, value in {"block": block, "stages": stages, **forced}.items():
        overwrite_param(kwargs, name, value)
    return ResNet(**kwargs)


def _se(kwargs: dict) -> dict:
    # SENet (Hu et al. 2018, Table 1): reduction ratio r = 16 in every block.
    kwargs.setdefault("attn_layer", partial(SqueezeExcite, rd_ratio=1 / 16))
    kwargs.setdefault("zero_init_residual", True)  # timm's ResNet zero-inits each block's last BN by default
    return kwargs


_TV = "torchvision's weights are the 'v1.5' ResNet: the stride sits in the 3x3 conv, not the first 1x1."


@register_model(RESNET, pretrained={"torchvision": "resnet18"}, notes="11.7M parameters; basic blocks 2-2-2-2.")
def resnet18(**kwargs) -> ResNet:
    return _build(BasicBlock, RESNET18, kwargs)


@register_model(RESNET, pretrained={"torchvision": "resnet34"},
                notes="21.8M parameters; basic blocks 3-4-6-3 of 64/128/256/512 maps (Table 1).")
def resnet34(**kwargs) -> ResNet:
    return _build(BasicBlock, RESNET34, kwargs)


@register_model(RESNET, pretrained={"torchvision": "resnet50"}, notes="25.6M parameters; bottlenecks 3-4-6-3. " + _TV)
def resnet50(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET50, kwargs)


@register_model(RESNET, pretrained={"torchvision": "resnet101"}, notes="44.5M parameters; bottlenecks 3-4-23-3. " + _TV)
def resnet101(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, kwargs)


@register_model(RESNET, pretrained={"torchvision": "resnet152"}, notes="60.2M parameters; bottlenecks 3-8-36-3. " + _TV)
def resnet152(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET152, kwargs)


@register_model(RESNEXT, pretrained={"torchvision": "resnext50_32x4d"},
                notes="ResNeXt-50 (32x4d): 32 groups of 4 channels in the first stage's 3x3 conv; 25.0M parameters.")
def resnext50_32x4d(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET50, kwargs, groups=32, base_width=4)


@register_model(RESNEXT, pretrained={"torchvision": "resnext101_32x8d"}, notes="ResNeXt-101 (32x8d); 88.8M parameters.")
def resnext101_32x8d(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, kwargs, groups=32, base_width=8)


@register_model(RESNEXT, pretrained={"torchvision": "resnext101_64x4d"}, notes="ResNeXt-101 (64x4d); 83.5M parameters.")
def resnext101_64x4d(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, kwargs, groups=64, base_width=4)


@register_model(WIDE_RESNET, pretrained={"torchvision": "wide_resnet50_2"},
                notes="ResNet-50 with bottlenecks twice as wide inside (the outer 1x1 widths are kept); 68.9M parameters.")
def wide_resnet50_2(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET50, kwargs, base_width=128)


@register_model(WIDE_RESNET, pretrained={"torchvision": "wide_resnet101_2"},
                notes="ResNet-101 with bottlenecks twice as wide inside; 126.9M parameters.")
def wide_resnet101_2(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, kwargs, base_width=128)


@register_model(SENET, pretrained={"timm": "seresnet50"},
                notes="ResNet-50 with squeeze-excite (r=16) on every residual branch; 28.1M parameters.")
def seresnet50(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET50, _se(kwargs))


@register_model(SENET, notes="SE-ResNet-101 (r=16); 49.3M parameters. timm has the architecture but no pretrained weights.")
def seresnet101(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, _se(kwargs))


@register_model(SENET, pretrained={"timm": "seresnext50_32x4d"}, notes="SE-ResNeXt-50 (32x4d, r=16); 27.6M parameters.")
def seresnext50_32x4d(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET50, _se(kwargs), groups=32, base_width=4)


@register_model(SENET, pretrained={"timm": "seresnext101_32x4d"}, notes="SE-ResNeXt-101 (32x4d, r=16); 49.0M parameters.")
def seresnext101_32x4d(**kwargs) -> ResNet:
    return _build(Bottleneck, RESNET101, _se(kwargs), groups=32, base_width=4)
