"""The demo's Fashion-MNIST networks: ``fmnist_fast`` (the demo's) and ``fmnist_net`` (``--quick``'s, and the demo's before).

``fmnist_net``: same family and class as the notes' model (:mod:`cnnlab.models.simple_cnn`), with
the stage table cut down: 32@3x3, pool, 2x64@3x3, pool, 128@3x3, pool, then one linear layer on
the 3x3x128 grid (about 14.6M multiply-adds per 28x28 image versus about 90M for ``simple_cnn``).

``fmnist_fast``: the same 7x7 stage behind a space-to-depth stem, and a hidden dense layer: 10.0M
multiply-adds, 0.6x fmnist_net's fp32 training time and half its bf16 time (benchmarks/RESULTS.md, demo).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import ConvNormAct, init_weights, make_act
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import register_model
from cnnlab.models.simple_cnn import SIMPLE_CNN, ConvStage, SimpleCNN

# narrower stages, one conv fewer at 28x28 and at 7x7 than NOTES_STAGES: the cost sits at 14x14
FAST_STAGES = (ConvStage(32, 1, 3), ConvStage(64, 2, 3), ConvStage(128, 1, 3))


@register_model(SIMPLE_CNN, default_input=(1, 28, 28),
                notes="BN simple CNN 32-64-64-128 with a linear head (cnnlab demo --quick); 92.98% on Fashion-MNIST in 9 "
                      "epochs, the demo's network until 2026-12-02.")
def fmnist_net(**kwargs) -> SimpleCNN:
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("stages", FAST_STAGES)
    kwargs.setdefault("hidden", ())
    kwargs.setdefault("norm_layer", nn.BatchNorm2d)
    return SimpleCNN(**kwargs)


# ---------------------------------------------------------------------------------------------
# fmnist_fast: the same budget spent where a CPU computes it efficiently (issue 8).
#
# On a CPU without bf16 units fmnist_net's 28x28 layer (conv 1->32, BN, ReLU, 2x2 pool, and
# their backward passes over 25k activations per image) is memory-bound: it costs far more time
# than its 0.2M multiply-adds suggest. A space-to-depth stem (PixelUnshuffle(2): 28x28x1 ->
# 14x14x4, lossless, no arithmetic) lets the first conv start at 14x14, where it sees a 6x6
# window at stride 2 -- the "patchify" stem of ConvNeXt/ViT and the space-to-depth stem of
# TResNet (Ridnik et al. 2021), here with a 3x3 conv over 2x2 patches.


@dataclass(frozen=True)
class FastStage:
    """A run of same-padded convs at one resolution, then (when ``pool``) a 2x2 max pool."""

    out_channels: int
    num_convs: int = 1
    pool: bool = True
    kernel_size: int = 3


@dataclass(frozen=True)
class FastNetConfig:
    """The table of a :class:`FastCNN`: a space-to-depth stem, then conv stages.

    Args:
        stem_factor: PixelUnshuffle factor of the stem (1 = none; 2 turns 28x28x1 into 14x14x4).
        stages: the conv stages, in order.
        head_size: the pooled grid the head flattens (3x3 at a 28x28 input).
        hidden: width of a batch-normalised hidden layer between the flattened grid and the classifier
            (0 = none: the classifier sees the grid).
    """

    stem_factor: int
    stages: tuple[FastStage, ...]
    head_size: int = 3
    hidden: int = 0


# 14x14: 48 then 64 channels (the stem already halved 28x28: no pool after the first); 7x7: 128; chosen by
# timing. Then a batch-normalised hidden layer of 512 on the 3x3x128 grid: +0.9 points at 5 epochs (92.92% and
# 92.85% over two seeds, against 91.94%) for 6% more multiply-adds and ~2% more time, where a second 7x7 conv cost
# 1.56x; 256 wide gave 92.74%, without its BatchNorm 92.37% (RESULTS.md, demo).
FAST_NET = FastNetConfig(stem_factor=2, stages=(FastStage(48, pool=False), FastStage(64), FastStage(128)), hidden=512)


class FastCNN(Classifier):
    """Space-to-depth stem, batch-normalised 3x3 conv stages with max pooling, a dense head.

    Args:
        config: the architecture table (:class:`FastNetConfig`).
        num_classes, in_channels: as everywhere.
        norm_layer, act_layer: factories for every conv's norm and activation.
        init: ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 8

    def __init__(
        self,
        config: FastNetConfig = FAST_NET,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if config.stem_factor < 1:
            raise CnnlabError(f"FastNetConfig.stem_factor must be >= 1 (1 = no space-to-depth), got {config.stem_factor}")
        self.num_classes, self.in_channels = num_classes, in_channels
        # the smallest input every pool still halves: the stem's factor times 2 per pooled stage
        self.min_input_size = config.stem_factor * 2 ** sum(stage.pool for stage in config.stages)
        self.stem = nn.PixelUnshuffle(config.stem_factor) if config.stem_factor > 1 else nn.Identity()
        channels, stride = in_channels * config.stem_factor ** 2, config.stem_factor
        layers: list[nn.Module] = []
        for i, stage in enumerate(config.stages):
            convs: list[nn.Module] = []
            for _ in range(stage.num_convs):
                convs.append(ConvNormAct(channels, stage.out_channels, stage.kernel_size, norm_layer=norm_layer,
                                         act_layer=act_layer))
                channels = stage.out_channels
            if stage.pool:
                convs.append(nn.MaxPool2d(2))
                stride *= 2
            layers.append(nn.Sequential(*convs))
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(config.head_size)  # the identity at a 28x28 input
        width = channels * config.head_size ** 2
        self.dense: nn.Module = nn.Identity()
        if config.hidden:  # no bias: the norm's shift is one
            self.dense = nn.Sequential(nn.Linear(width, config.hidden, bias=False), nn.BatchNorm1d(config.hidden),
                                       make_act(act_layer))
            width = config.hidden
        self.num_features = width
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        factor = self.stem.downscale_factor if isinstance(self.stem, nn.PixelUnshuffle) else 1
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise CnnlabError(f"{type(self).__name__}'s space-to-depth stem needs a height and width divisible by "
                              f"{factor}; got {tuple(x.shape)} (resize, e.g. data.image_size={x.shape[-1] // factor * factor})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, 1, 28, 28) -> (B, 4, 14, 14) -> (B, 128, 3, 3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dense(torch.flatten(self.pool(x), 1))  # (B, C, 3, 3) -> (B, 9C) -> (B, hidden)
        return x if pre_logits else self.fc(x)


@register_model(SIMPLE_CNN, default_input=(1, 28, 28),
                notes="cnnlab demo network: space-to-depth stem, 48-64 at 14x14, 128 at 7x7, dense 512; 0.6x "
                      "fmnist_net's fp32 training time; 93.70% in 18 epochs (bf16), 93.04% in 5.4 (fp32) (RESULTS.md, demo).")
def fmnist_fast(**kwargs) -> FastCNN:
    return FastCNN(kwargs.pop("config", FAST_NET), **kwargs)
