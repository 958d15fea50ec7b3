"""SqueezeNet 1.0 and 1.1 (Iandola et al., 2016, "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters").

A conv stem, then Fire modules (``cnnlab.layers.fire.Fire``: squeeze 1x1, expand 1x1 + 3x3,
concatenated) with max pooling between groups, and no fully connected layer at all: the
classifier is a 1x1 conv to ``num_classes`` maps, averaged over the image (§3.3).
SqueezeNet 1.0 is the paper's Table 1 (1,248,424 parameters; the paper: 1,248,424, "1.2M");
1.1 (from the authors' repository) uses a 3x3 stem with 64 maps and pools earlier, costing
2.4x less computation for the same accuracy (1,235,496 parameters).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cnnlab.layers import ConvNormAct, init_weights
from cnnlab.layers.init import torchvision_squeezenet_init
from cnnlab.layers.fire import Fire
from cnnlab.models.alexnet import pool_output_size
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

SQUEEZENET = Family(
    name="SqueezeNet",
    paper="Iandola et al., SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size",
    year=2016,
    url="https://arxiv.org/abs/1602.07360",
)


@dataclass(frozen=True)
class FireRow:
    """One Fire module; ``pool_before`` puts a 3x3/2 max pool in front of it (starting a stage)."""

    squeeze: int
    expand1x1: int
    expand3x3: int
    pool_before: bool = False


@dataclass(frozen=True)
class SqueezeNetConfig:
    """The stem conv (stride 2, unpadded) and the Fire modules."""

    stem_channels: int
    stem_kernel_size: int
    fires: tuple[FireRow, ...]


# Iandola et al. 2016, Table 1 (conv1 96 7x7/2; fire2..fire9; pools after conv1, fire4 and fire8).
SQUEEZENET1_0 = SqueezeNetConfig(96, 7, (
    FireRow(16, 64, 64, pool_before=True), FireRow(16, 64, 64), FireRow(32, 128, 128),
    FireRow(32, 128, 128, pool_before=True), FireRow(48, 192, 192), FireRow(48, 192, 192), FireRow(64, 256, 256),
    FireRow(64, 256, 256, pool_before=True),
))
# SqueezeNet v1.1 (github.com/forresti/SqueezeNet, v1.1 README): conv1 64 3x3/2; pools after conv1, fire3, fire5.
SQUEEZENET1_1 = SqueezeNetConfig(64, 3, (
    FireRow(16, 64, 64, pool_before=True), FireRow(16, 64, 64),
    FireRow(32, 128, 128, pool_before=True), FireRow(32, 128, 128),
    FireRow(48, 192, 192, pool_before=True), FireRow(48, 192, 192), FireRow(64, 256, 256), FireRow(64, 256, 256),
))


class SqueezeNet(Classifier):
    """SqueezeNet: stem conv, Fire modules in pooled stages, a 1x1 conv classifier, global average pooling.

    Module layout: ``stem`` (stride 2), ``stages.i`` = (max pool, Fire, Fire, ...), then
    ``final_conv`` (the classifier, a 1x1 conv), its ReLU and the global average pool.

    Args:
        config: ``SQUEEZENET1_0`` or ``SQUEEZENET1_1``.
        drop_rate: dropout before the final conv (0.5, after fire9 in the paper).
        norm_layer: None in the paper; a factory adds normalisation after every conv.
        init: ``"reference"`` (torchvision's: He uniform fan_in convs), ``"kaiming"``, ``"xavier"`` or
            ``"none"``; unless ``"none"``, the final conv starts at N(0, 0.01) as in the reference code,
            so the first logits are near zero.
    """

    head_name = "final_conv"
    min_input_size = 21  # set per instance from the config (21 for 1.0, 17 for 1.1)

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        config: SqueezeNetConfig = SQUEEZENET1_0,
        drop_rate: float = 0.5,
        norm_layer: Callable[..., nn.Module] | None = None,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        # the stem conv is unpadded, as in the paper and torchvision
        self.stem = ConvNormAct(in_channels, config.stem_channels, config.stem_kernel_size, 2, padding=0, norm_layer=norm_layer)
        channels, stride = config.stem_channels, 2
        self.feature_info.append(FeatureInfo("stem", channels, stride))
        stages: list[nn.Module] = []
        for i, rows in enumerate(_group_stages(config)):
            blocks: list[nn.Module] = []
            if rows[0].pool_before:
                blocks.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                stride *= 2
            for row in rows:
                blocks.append(Fire(channels, row.squeeze, row.expand1x1, row.expand3x3, norm_layer=norm_layer))
                channels = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(drop_rate)
        self.num_features = channels
        self.final_conv: nn.Module = nn.Conv2d(channels, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.min_input_size = _min_input_size(config)
        init_weights(self, init, lambda m: torchvision_squeezenet_init(m, self.final_conv))
        if init != "none" and isinstance(self.final_conv, nn.Conv2d):
            nn.init.normal_(self.final_conv.weight, 0.0, 0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, 3, 224, 224) -> (B, 512, 13, 13) (1.0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(x)
        if pre_logits:  # the classifier sees a map; its pooled version is the feature vector
            return torch.flatten(self.pool(x), 1)  # (B, 512)
        return torch.flatten(self.pool(self.act(self.final_conv(x))), 1)  # (B, num_classes, H, W) -> (B, num_classes)


    def reset_classifier(self, num_classes: int) -> None:
        """A new 1x1 conv classifier (N(0, 0.01) init); ``num_classes=0`` removes it."""
        first = next(self.parameters())
        head = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        self.final_conv = head.to(device=first.device, dtype=first.dtype)
        self.num_classes = max(num_classes, 0)


def _group_stages(config: SqueezeNetConfig) -> list[list[FireRow]]:
    """The Fire rows split into stages: a new stage starts at every ``pool_before``."""
    stages: list[list[FireRow]] = []
    for row in config.fires:
        if row.pool_before or not stages:
            stages.append([])
        stages[-1].append(row)
    return stages


def _min_input_size(config: SqueezeNetConfig) -> int:
    """Smallest input whose unpadded stem and ceil-mode 3x3/2 pools all leave at least one pixel."""

    def out_size(size: int) -> int:
        size = (size - config.stem_kernel_size) // 2 + 1
        for row in config.fires:
            if size < 1:
                return 0
            if row.pool_before:
                size = pool_output_size(size, 3, 2, ceil_mode=True)
        return size

    size = config.stem_kernel_size
    while out_size(size) < 1:
        size += 1
    return size


def _tv_converter(config: SqueezeNetConfig) -> Callable[[StateDict], StateDict]:
    """torchvision's ``features.0`` (stem), Fire modules in order and ``classifier.1`` onto cnnlab names."""
    positions = []
    for i, rows in enumerate(_group_stages(config)):
        offset = 1 if rows[0].pool_before else 0  # the stage's pool is its child 0
        positions += [f"stages.{i}.{offset + j}" for j in range(len(rows))]
    return partial(_convert, positions=positions)


def _convert(state_dict: StateDict, positions: Sequence[str]) -> StateDict:
    sd = dict(state_dict)
    fire_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("features.") and ".squeeze." in k})
    if len(fire_ids) != len(positions):
        raise KeyError(f"expected {len(positions)} Fire modules, found {len(fire_ids)}")
    out: StateDict = {}
    for param in ("weight", "bias"):
        out[f"stem.conv.{param}"] = sd.pop(f"features.0.{param}")
        out[f"final_conv.{param}"] = sd.pop(f"classifier.1.{param}")
        for pos, n in zip(positions, fire_ids):
            for conv in ("squeeze", "expand1x1", "expand3x3"):
                out[f"{pos}.{conv}.conv.{param}"] = sd.pop(f"features.{n}.{conv}.{param}")
    out.update(sd)  # leftovers are reported as unexpected by load_weights
    return out


@register_model(
    SQUEEZENET,
    pretrained={"torchvision": "squeezenet1_0"},
    converters={"torchvision": _tv_converter(SQUEEZENET1_0)},
    notes="1,248,424 parameters (Iandola 2016 Table 1: 1,248,424 without compression).",
)
def squeezenet1_0(**kwargs) -> SqueezeNet:
    overwrite_param(kwargs, "config", SQUEEZENET1_0)
    return SqueezeNet(**kwargs)


@register_model(
    SQUEEZENET,
    pretrained={"torchvision": "squeezenet1_1"},
    converters={"torchvision": _tv_converter(SQUEEZENET1_1)},
    notes="1,235,496 parameters; 2.4x less computation than 1.0 at the same accuracy (authors' v1.1 README).",
)
def squeezenet1_1(**kwargs) -> SqueezeNet:
    overwrite_param(kwargs, "config", SQUEEZENET1_1)
    return SqueezeNet(**kwargs)
