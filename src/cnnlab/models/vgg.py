"""VGG (Simonyan & Zisserman, 2015, "Very deep convolutional networks for large-scale image recognition").

Stacks of 3x3 convs (stride 1, "same" padding), each stack followed by 2x2/2 max pooling,
then AlexNet's 4096-4096-1000 classifier. Three stacked 3x3 convs see 7x7 with 27C²
weights instead of 49C² for one 7x7 (§2.3). VGG-16 has 138,357,544 parameters (the paper's
Table 2: 138M); 89% of them sit in the three FC layers (fc6 alone: 102.8M), while most
activation memory is in the early, high-resolution convs: at 224x224 the outputs of the
input, every conv, pool and FC layer add up to 15,237,608 values per image (61 MB in
float32), 71% of them in the first two stages. The study notes' total of "24M = 96 MB"
does not follow from their own per-layer rows, which sum to this same 15.2M (61 MB);
15.2M is right (tests/models/test_vgg.py counts it from the real feature maps).

``*_bn`` variants add batch norm after every conv (torchvision's, not in the paper); the
convs keep their bias, as torchvision's do, so its checkpoints load.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cnnlab.layers import ConvNormAct, init_weights
from cnnlab.layers.init import kaiming_init
from cnnlab.models.alexnet import FCHead, convert_sequential
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

VGG = Family(
    name="VGG",
    paper="Simonyan & Zisserman, Very deep convolutional networks for large-scale image recognition",
    year=2015,
    url="https://arxiv.org/abs/1409.1556",
)


@dataclass(frozen=True)
class VGGStage:
    """``num_convs`` 3x3 convs with ``out_channels`` maps, then a 2x2/2 max pool."""

    out_channels: int
    num_convs: int


def _stages(*convs_per_stage: int) -> tuple[VGGStage, ...]:
    return tuple(VGGStage(c, n) for c, n in zip((64, 128, 256, 512, 512), convs_per_stage))


# Simonyan & Zisserman 2015, Table 1, configurations A, B, D, E (widths 64-128-256-512-512).
VGG11 = _stages(1, 1, 2, 2, 2)  # A
VGG13 = _stages(2, 2, 2, 2, 2)  # B
VGG16 = _stages(2, 2, 3, 3, 3)  # D
VGG19 = _stages(2, 2, 4, 4, 4)  # E


class VGGNet(Classifier):
    """VGG: stages of 3x3 conv (+norm) + ReLU ending in max pooling, then the FC head.

    Args:
        stages: the conv stages (``VGG11`` ... ``VGG19``).
        norm_layer: None in the paper; ``nn.BatchNorm2d`` for the ``_bn`` variants.
        act_layer: ReLU in the paper.
        drop_rate: dropout after fc6 and fc7 (0.5).
        init: ``"reference"`` = ``"kaiming"`` (torchvision's scheme: He fan-out convs, N(0, 0.01) linears),
            ``"xavier"`` or ``"none"``.
    """

    head_name = "head.fc"
    min_input_size = 32  # five 2x2 pools: 32 -> 1

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stages: Sequence[VGGStage] = VGG16,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        drop_rate: float = 0.5,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        blocks: list[nn.Module] = []
        channels, stride = in_channels, 1
        for i, stage in enumerate(stages):
            convs = []
            for _ in range(stage.num_convs):
                convs.append(ConvNormAct(channels, stage.out_channels, 3, bias=True, norm_layer=norm_layer, act_layer=act_layer))
                channels = stage.out_channels
            block = nn.Sequential(*convs)
            block.add_module("pool", nn.MaxPool2d(2, 2))
            stride *= 2
            blocks.append(block)
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*blocks)
        self.head = FCHead(channels, num_classes, pool_size=7, drop_rate=drop_rate, act_layer=act_layer)
        self.num_features = self.head.fc7.out_features
        init_weights(self, init, kaiming_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, 3, 224, 224) -> (B, 512, 7, 7)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)


def _tv_converter(stages: Sequence[VGGStage]) -> Callable[[StateDict], StateDict]:
    """torchvision's ``features.N`` convs, in order, onto ``stages.i.j`` (with or without BN)."""
    convs = [f"stages.{i}.{j}" for i, s in enumerate(stages) for j in range(s.num_convs)]
    return partial(convert_sequential, convs=convs, fcs=["head.fc6", "head.fc7", "head.fc"])


def _vgg(stages: tuple[VGGStage, ...], batch_norm: bool, kwargs: dict) -> VGGNet:
    overwrite_param(kwargs, "stages", stages)
    if batch_norm:
        kwargs.setdefault("norm_layer", nn.BatchNorm2d)
    return VGGNet(**kwargs)


def _info(name: str, num_params: int, paper: str = "") -> dict:
    """Registry metadata; ``num_params`` is torchvision's (its weights' metadata), checked in tests/models/test_vgg.py."""
    notes = f"{num_params:,} parameters at 1000 classes (= torchvision's {name}).{paper}"
    return {"pretrained": {"torchvision": name}, "notes": notes}


@register_model(VGG, converters={"torchvision": _tv_converter(VGG11)}, **_info("vgg11", 132_863_336))
def vgg11(**kwargs) -> VGGNet:
    return _vgg(VGG11, False, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG11)}, **_info("vgg11_bn", 132_868_840))
def vgg11_bn(**kwargs) -> VGGNet:
    return _vgg(VGG11, True, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG13)}, **_info("vgg13", 133_047_848))
def vgg13(**kwargs) -> VGGNet:
    return _vgg(VGG13, False, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG13)}, **_info("vgg13_bn", 133_053_736))
def vgg13_bn(**kwargs) -> VGGNet:
    return _vgg(VGG13, True, kwargs)


@register_model(
    VGG, converters={"torchvision": _tv_converter(VGG16)},
    **_info("vgg16", 138_357_544, " Simonyan & Zisserman 2015 Table 2: 138M."),
)
def vgg16(**kwargs) -> VGGNet:
    return _vgg(VGG16, False, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG16)}, **_info("vgg16_bn", 138_365_992))
def vgg16_bn(**kwargs) -> VGGNet:
    return _vgg(VGG16, True, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG19)}, **_info("vgg19", 143_667_240))
def vgg19(**kwargs) -> VGGNet:
    return _vgg(VGG19, False, kwargs)


@register_model(VGG, converters={"torchvision": _tv_converter(VGG19)}, **_info("vgg19_bn", 143_678_248))
def vgg19_bn(**kwargs) -> VGGNet:
    return _vgg(VGG19, True, kwargs)
