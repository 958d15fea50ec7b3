"""CIFAR pre-activation ResNets (He et al. 2016b) and Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016).

Both are three stages of pre-activation units on a 32x32 input: a 3x3 conv to 16 maps,
stages of 16/32/64 maps (times ``widen_factor`` for WRN; times 4 after a bottleneck) at
strides 1, 2, 2, a final BN-ReLU ("an extra activation after the last element-wise
addition", He et al. 2016b, Sec. 4.1), global average pooling and a linear classifier.

Depth counts the weighted layers of the main path:

- pre-activation ResNet: ``6n + 2`` with basic units (2 convs), ``9n + 2`` with bottlenecks (3 convs);
  n units per stage. ResNet-164 and ResNet-1001 are the bottleneck ones.
- WRN-d-k: ``d = 6n + 4`` with basic units, ``k`` the widening factor, dropout between the
  two convs of each unit (0.3 in the paper's best CIFAR results).

state_dict keys::

    stem.conv.weight
    layer{1,2,3}.{i}.preact.norm.*, layer{1,2,3}.{i}.residual.conv{1,2[,3]}.weight,
    layer{1,2,3}.{i}.residual.norm{2[,3]}.*, layer{1,2,3}.{i}.shortcut.weight (projection only)
    final.norm.*, fc.weight, fc.bias
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, get_act_layer, get_norm_layer, init_weights, zero_init_last_norm
from cnnlab.layers.init import kaiming_init
from cnnlab.layers.residual import NormAct, PreActBasicBlock, PreActBottleneck
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, overwrite_param, register_model

LayerFactory = Callable[..., nn.Module]
PreActBlockType = type[PreActBasicBlock] | type[PreActBottleneck]

PREACT_RESNET = Family("Pre-activation ResNet", "He et al., Identity Mappings in Deep Residual Networks (ECCV 2016)",
                       2016, "https://arxiv.org/abs/1603.05027")
WRN = Family("Wide ResNet", "Zagoruyko & Komodakis, Wide Residual Networks (BMVC 2016)", 2016,
             "https://arxiv.org/abs/1605.07146")
CIFAR_INPUT = (3, 32, 32)


@dataclass(frozen=True)
class CifarStage:
    """One of the three stages: ``num_blocks`` units giving ``out_channels`` maps; the first unit strides."""

    num_blocks: int
    out_channels: int
    stride: int


def cifar_stages(num_blocks: int, widths: tuple[int, int, int]) -> tuple[CifarStage, ...]:
    """He et al. 2016 (Sec. 4.2) / Zagoruyko & Komodakis 2016 (Table 1): three stages at strides 1, 2, 2."""
    return tuple(CifarStage(num_blocks, w, s) for w, s in zip(widths, (1, 2, 2)))


class PreActResNet(Classifier):
    """Three stages of pre-activation units on a 3x3 conv stem; the CIFAR ResNet and Wide ResNet.

    Args:
        block: ``PreActBasicBlock`` or ``PreActBottleneck``.
        stages: the stage table (``CifarStage`` rows).
        stem_channels: maps of the first 3x3 conv (16 in both papers).
        num_classes, in_channels: classifier outputs (10 for CIFAR-10) and input channels.
        block_drop_rate: dropout between the convs of every unit (WRN's dropout; 0 for He et al.).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last unit, linearly less for earlier ones.
        norm_layer, act_layer, attn_layer: factories (or names for norm/act); ``attn_layer`` None means none.
        zero_init_residual: zero each unit's last conv so the network starts as a chain of identities.
        init: ``"reference"`` = ``"kaiming"``: neither torchvision nor timm has these CIFAR networks, and both
            papers initialise as He et al. 2015 (normal, n = k*k*out as in the authors' Torch code);
            ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 8  # stride 4 overall: an 8x8 input still leaves a 2x2 map to pool

    def __init__(
        self,
        *,
        block: PreActBlockType,
        stages: tuple[CifarStage, ...],
        stem_channels: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        block_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: LayerFactory | str = nn.BatchNorm2d,
        act_layer: LayerFactory | str = nn.ReLU,
        attn_layer: LayerFactory | None = None,
        zero_init_residual: bool = False,
        init: str = "reference",
    ) -> None:
        super().__init__()
        for name, p in (("block_drop_rate", block_drop_rate), ("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= p < 1.0:
                raise CnnlabError(f"{name} must be in [0, 1), got {p}")
        if len(stages) != 3:
            raise CnnlabError(f"the CIFAR networks have 3 stages, got {len(stages)} stage rows")
        norm_layer = get_norm_layer(norm_layer)
        act_layer = get_act_layer(act_layer)
        self.num_classes, self.in_channels = num_classes, in_channels
        # a bare conv: the first unit's pre-activation supplies its BN-ReLU
        self.stem = ConvNormAct(in_channels, stem_channels, 3, norm_layer=None, act_layer=None, bias=False)

        channels, stride = stem_channels, 1
        total_blocks, block_index = sum(s.num_blocks for s in stages), 0
        for i, stage in enumerate(stages):
            stride *= stage.stride
            blocks = []
            for j in range(stage.num_blocks):
                blocks.append(block(
                    channels, stage.out_channels, stage.stride if j == 0 else 1,
                    drop_rate=block_drop_rate, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer,
                    drop_path=drop_path_rate * block_index / max(total_blocks - 1, 1),
                ))
                channels, block_index = stage.out_channels, block_index + 1
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            # the last stage is tapped after the final BN-ReLU, the features the classifier sees
            self.feature_info.append(FeatureInfo(name if i < len(stages) - 1 else "final", channels, stride))
        self.final = NormAct(channels, norm_layer, act_layer)
        self.num_features = channels

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init, kaiming_init)
        if zero_init_residual:
            zero_init_last_norm(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C, 32, 32) -> (B, 16, 32, 32)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)  # -> (B, 64 * k, 8, 8)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))  # (B, C, 8, 8) -> (B, C)
        return x if pre_logits else self.fc(x)


def _force(kwargs: dict, **forced) -> dict:
    for name, value in forced.items():
        overwrite_param(kwargs, name, value)
    return kwargs


# -- pre-activation ResNet (He et al. 2016b) -------------------------------------------------------
def preact_resnet(*, depth: int = 164, bottleneck: bool | None = None, **kwargs) -> PreActResNet:
    """A CIFAR pre-activation ResNet of any valid depth: 6n+2 (basic units) or 9n+2 (bottlenecks).

    ``bottleneck=None`` follows the paper: bottlenecks from depth 164 up, when 9n+2 fits.
    """
    if not isinstance(depth, int) or depth < 8:
        raise CnnlabError(f"depth must be an int of the form 6n+2 (basic) or 9n+2 (bottleneck), got {depth!r}")
    if bottleneck is None:
        bottleneck = depth >= 164 and (depth - 2) % 9 == 0 or (depth - 2) % 6 != 0
    per_block = 3 if bottleneck else 2
    if (depth - 2) % (3 * per_block):
        kind = "9n+2 with bottleneck units" if bottleneck else "6n+2 with basic units"
        raise CnnlabError(f"depth {depth} does not fit a pre-activation ResNet: expected {kind} (e.g. 20, 56, 110; 164, 1001)")
    block = PreActBottleneck if bottleneck else PreActBasicBlock
    widths = tuple(w * block.expansion for w in (16, 32, 64))
    return PreActResNet(**_force(kwargs, block=block, stages=cifar_stages((depth - 2) // (3 * per_block), widths)))


register_model(PREACT_RESNET, default_input=CIFAR_INPUT, name="preact_resnet",
               notes="Any depth: create_model('preact_resnet', depth=272); default ResNet-164.")(preact_resnet)


# Parameter counts at 10 classes, with the paper's figure (He et al. 2016b, Tables 2-4, CIFAR-10).
@register_model(PREACT_RESNET, default_input=CIFAR_INPUT, notes="6n+2 with n=3 basic units per stage; 0.27M parameters.")
def preact_resnet20(**kwargs) -> PreActResNet:
    return preact_resnet(**_force(kwargs, depth=20, bottleneck=False))


@register_model(PREACT_RESNET, default_input=CIFAR_INPUT, notes="n=9 basic units per stage; 0.86M parameters.")
def preact_resnet56(**kwargs) -> PreActResNet:
    return preact_resnet(**_force(kwargs, depth=56, bottleneck=False))


@register_model(PREACT_RESNET, default_input=CIFAR_INPUT, notes="n=18 basic units per stage; 1.7M parameters (paper: 1.7M).")
def preact_resnet110(**kwargs) -> PreActResNet:
    return preact_resnet(**_force(kwargs, depth=110, bottleneck=False))


@register_model(PREACT_RESNET, default_input=CIFAR_INPUT, notes="9n+2 with n=18 bottlenecks per stage; 1.7M parameters (paper: 1.7M).")
def preact_resnet164(**kwargs) -> PreActResNet:
    return preact_resnet(**_force(kwargs, depth=164, bottleneck=True))


@register_model(PREACT_RESNET, default_input=CIFAR_INPUT, notes="n=111 bottlenecks per stage; 10.3M parameters (paper: 10.2M).")
def preact_resnet1001(**kwargs) -> PreActResNet:
    return preact_resnet(**_force(kwargs, depth=1001, bottleneck=True))


# -- Wide ResNet (Zagoruyko & Komodakis 2016) ------------------------------------------------------
def wrn(*, depth: int = 16, widen_factor: int = 4, **kwargs) -> PreActResNet:
    """WRN-d-k: ``(d - 4) / 6`` basic units per stage of 16k/32k/64k maps, dropout 0.3 between convs."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise CnnlabError(f"WRN depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth!r}")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise CnnlabError(f"widen_factor must be a positive int, got {widen_factor!r}")
    kwargs.setdefault("block_drop_rate", 0.3)  # the paper's best CIFAR setting (Table 6)
    stages = cifar_stages((depth - 4) // 6, (16 * widen_factor, 32 * widen_factor, 64 * widen_factor))
    return PreActResNet(**_force(kwargs, block=PreActBasicBlock, stages=stages))


register_model(WRN, default_input=CIFAR_INPUT, name="wrn",
               notes="Any WRN-d-k: create_model('wrn', depth=22, widen_factor=8); default WRN-16-4.")(wrn)


@register_model(WRN, default_input=CIFAR_INPUT, notes="WRN-16-8: 11.0M parameters (paper Table 4: 11.0M).")
def wrn_16_8(**kwargs) -> PreActResNet:
    return wrn(**_force(kwargs, depth=16, widen_factor=8))


@register_model(WRN, default_input=CIFAR_INPUT, notes="WRN-28-10: 36.5M parameters (paper Table 4: 36.5M).")
def wrn_28_10(**kwargs) -> PreActResNet:
    return wrn(**_force(kwargs, depth=28, widen_factor=10))


@register_model(WRN, default_input=CIFAR_INPUT, notes="WRN-40-4: 8.9M parameters (paper Table 4: 8.9M).")
def wrn_40_4(**kwargs) -> PreActResNet:
    return wrn(**_force(kwargs, depth=40, widen_factor=4))
