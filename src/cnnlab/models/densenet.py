"""DenseNet-BC (Huang et al., 2017, "Densely Connected Convolutional Networks").

Stem (7x7/2 conv, 3x3/2 max pool), four dense blocks with transitions (BN-ReLU-1x1 conv,
compression 0.5, 2x2 average pool) between them, a final BN-ReLU, global average pooling
and a linear classifier. Variants differ in the layers per block (Table 1).

state_dict layout::

    stem.conv.{conv,norm}.*                          7x7/2 conv + BN (+ ReLU), then stem.pool
    stages.{i}.transition.{norm,conv}.*              before blocks 2-4
    stages.{i}.block.layers.{j}.conv1.{norm,conv}.*  1x1 bottleneck (BN-ReLU-Conv)
    stages.{i}.block.layers.{j}.conv2.{norm,conv}.*  3x3 conv (BN-ReLU-Conv)
    final_norm.norm.*, fc.*
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, get_act_layer, get_norm_layer, init_weights, make_act
from cnnlab.layers.dense import DenseBlock, Transition
from cnnlab.layers.init import torchvision_densenet_init
from cnnlab.models._convert import replace_prefix
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, register_model


@dataclass(frozen=True)
class DenseNetConfig:
    """One column of the paper's Table 1: dense layers per block, growth rate k, stem width."""

    block_layers: tuple[int, ...]
    growth_rate: int = 32
    stem_channels: int = 64  # 2k in the paper


# Huang et al. 2017, Table 1 (ImageNet architectures, k = 32). DenseNet-161 is the k = 48
# network of the authors' released models (stem 2k = 96), as in torchvision.
DENSENET121 = DenseNetConfig((6, 12, 24, 16))
DENSENET169 = DenseNetConfig((6, 12, 32, 32))
DENSENET201 = DenseNetConfig((6, 12, 48, 32))
DENSENET161 = DenseNetConfig((6, 12, 36, 24), growth_rate=48, stem_channels=96)


class DenseNet(Classifier):
    """DenseNet-BC read from a ``DenseNetConfig``.

    Args:
        config: layers per dense block, growth rate and stem width (Table 1).
        growth_rate: overrides the config's ``k``.
        bn_size: bottleneck width in multiples of ``k`` (4, "-B"); 0 removes the bottleneck.
        compression: theta, the fraction of channels a transition keeps (0.5, "-C").
        drop_rate: dropout after each dense layer (the paper: 0.2 on CIFAR without augmentation).
        memory_efficient: recompute concatenations in the backward pass (less memory, ~20% slower);
            note that batch norms inside the recomputed part update their running stats twice.
        norm_layer, act_layer: factories or names (``"batchnorm"``, ``"relu"``, ...).
        init: ``"reference"`` (torchvision's: He normal fan_in convs), ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 32

    def __init__(
        self,
        config: DenseNetConfig = DENSENET121,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        growth_rate: int | None = None,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        norm_layer: Callable[..., nn.Module] | str = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] | str = nn.ReLU,
        init: str = "reference",
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise CnnlabError(f"compression must be in (0, 1] (the paper uses 0.5), got {compression}")
        if bn_size < 0 or (growth_rate is not None and growth_rate < 1):
            raise CnnlabError(f"growth_rate must be >= 1 and bn_size >= 0, got {growth_rate} and {bn_size}")
        self.num_classes, self.in_channels = num_classes, in_channels
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        k = growth_rate or config.growth_rate

        self.stem = nn.Sequential(OrderedDict(
            conv=ConvNormAct(in_channels, config.stem_channels, 7, stride=2, norm_layer=norm_layer, act_layer=act_layer),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        ))
        self.feature_info.append(FeatureInfo("stem.conv", config.stem_channels, 2))
        channels, stride = config.stem_channels, 4
        stages = []
        for i, num_layers in enumerate(config.block_layers):
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                parts["transition"] = Transition(channels, int(compression * channels), norm_layer, act_layer)
                channels, stride = parts["transition"].out_channels, stride * 2
            parts["block"] = DenseBlock(num_layers, channels, k, bn_size, drop_rate, memory_efficient, norm_layer, act_layer)
            channels = parts["block"].out_channels
            stages.append(nn.Sequential(parts))
            if i < len(config.block_layers) - 1:
                self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*stages)
        # DenseNet-BC ends pre-activation blocks with one more BN-ReLU before pooling.
        self.final_norm = nn.Sequential(OrderedDict(norm=norm_layer(channels), act=make_act(act_layer)))
        self.feature_info.append(FeatureInfo("final_norm", channels, stride))
        self.num_features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init, torchvision_densenet_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.fc(x)


# -- torchvision checkpoints ---------------------------------------------------------------

# torchvision's released DenseNet files predate PyTorch 0.4 and name dense-layer children
# 'norm.1', 'conv.2', ...; current torchvision names them 'norm1', 'conv2'. Both are read.
_TV_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")
_TV_TRANSITION = re.compile(r"^features\.transition(\d+)\.(norm|conv)\.(.+)$")
_TV_FIXED = {"features.conv0.": "stem.conv.conv.", "features.norm0.": "stem.conv.norm.",
             "features.norm5.": "final_norm.norm.", "classifier.": "fc."}


def add_missing_num_batches_tracked(state_dict: StateDict) -> StateDict:
    """Checkpoints saved before PyTorch 0.4 lack BN's ``num_batches_tracked``: add it as 0, as BatchNorm does."""
    for key in [k for k in state_dict if k.endswith(".running_mean")]:
        counter = key[: -len("running_mean")] + "num_batches_tracked"
        state_dict.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return state_dict


def convert_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``DenseNet`` state_dict (old 'norm.1' or new 'norm1' keys) -> cnnlab layout."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if m := _TV_LAYER.match(key):
            block, layer, kind, which, rest = m.groups()
            new = f"stages.{int(block) - 1}.block.layers.{int(layer) - 1}.conv{which}.{kind}.{rest}"
        elif m := _TV_TRANSITION.match(key):
            new = f"stages.{m.group(1)}.transition.{m.group(2)}.{m.group(3)}"
        else:
            new = replace_prefix(key, _TV_FIXED, "torchvision DenseNet")
        out[new] = value
    return add_missing_num_batches_tracked(out)


DENSENET = Family(
    name="DenseNet",
    paper="Huang, Liu, van der Maaten, Weinberger: Densely Connected Convolutional Networks (CVPR 2017)",
    year=2017,
    url="https://arxiv.org/abs/1608.06993",
    converters={"torchvision": convert_torchvision},
)


def _densenet(config: DenseNetConfig, **kwargs) -> DenseNet:
    return DenseNet(config, **kwargs)


@register_model(DENSENET, pretrained={"torchvision": "densenet121"}, notes="Table 1, k=32: 6-12-24-16 layers; 8.0M parameters.")
def densenet121(**kwargs) -> DenseNet:
    return _densenet(DENSENET121, **kwargs)


@register_model(DENSENET, pretrained={"torchvision": "densenet169"}, notes="Table 1, k=32: 6-12-32-32 layers.")
def densenet169(**kwargs) -> DenseNet:
    return _densenet(DENSENET169, **kwargs)


@register_model(DENSENET, pretrained={"torchvision": "densenet201"}, notes="Table 1, k=32: 6-12-48-32 layers.")
def densenet201(**kwargs) -> DenseNet:
    return _densenet(DENSENET201, **kwargs)


@register_model(DENSENET, pretrained={"torchvision": "densenet161"}, notes="k=48, stem 96: 6-12-36-24 layers (authors' release).")
def densenet161(**kwargs) -> DenseNet:
    return _densenet(DENSENET161, **kwargs)
