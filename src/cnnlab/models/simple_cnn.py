"""The study notes' Fashion-MNIST CNN (Géron, *Hands-On Machine Learning*, ch. 14).

Keras original::

    Conv2D(64, 7, relu, same) -> MaxPool(2) -> 2 x Conv2D(128, 3) -> MaxPool(2)
    -> 2 x Conv2D(256, 3) -> MaxPool(2) -> Flatten -> Dense(128) -> Dropout(0.5)
    -> Dense(64) -> Dropout(0.5) -> Dense(10)

The notes report about 92% test accuracy on Fashion-MNIST.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.layers import ConvNormAct, init_weights
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, register_model

SIMPLE_CNN = Family(
    name="Simple CNN",
    paper="Géron, Hands-On Machine Learning, 2nd ed., ch. 14 (the notes' Fashion-MNIST model)",
    year=2019,
)


@dataclass(frozen=True)
class ConvStage:
    """A run of same-padded convs followed by a 2x2 max pool."""

    out_channels: int
    num_convs: int
    kernel_size: int


# The notes' table: 64@7x7, pool, 2x128, pool, 2x256, pool.
NOTES_STAGES = (ConvStage(64, 1, 7), ConvStage(128, 2, 3), ConvStage(256, 2, 3))


class SimpleCNN(Classifier):
    """A plain conv stack with a dense head (the notes' Fashion-MNIST model).

    Args:
        stages: conv stages, each followed by 2x2 max pooling.
        hidden: widths of the dense layers before the classifier.
        drop_rate: dropout after each dense layer (0.5 in the notes).
        norm_layer: None in the notes; ``nn.BatchNorm2d`` gives a faster-training variant.
        head_size: the pooled grid the head flattens (3x3 for a 28x28 input, as in Keras).
        init: ``"kaiming"``, ``"xavier"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 8

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        stages: tuple[ConvStage, ...] = NOTES_STAGES,
        hidden: tuple[int, ...] = (128, 64),
        drop_rate: float = 0.5,
        norm_layer: Callable[..., nn.Module] | None = None,
        head_size: int = 3,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        layers: list[nn.Module] = []
        channels, stride = in_channels, 1
        for i, stage in enumerate(stages):
            convs = []
            for j in range(stage.num_convs):
                convs.append(ConvNormAct(channels, stage.out_channels, stage.kernel_size, norm_layer=norm_layer))
                channels = stage.out_channels
            convs.append(nn.MaxPool2d(2))
            stride *= 2
            layers.append(nn.Sequential(*convs))
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(head_size)  # the identity at 28x28, where Keras' Flatten sees 3x3
        dense: list[nn.Module] = []
        width = channels * head_size * head_size
        for h in hidden:
            dense += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            width = h
        self.dense = nn.Sequential(*dense)
        self.num_features = width
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dense(torch.flatten(self.pool(x), 1))  # (B, C, 3, 3) -> (B, 9C) -> (B, 64)
        return x if pre_logits else self.fc(x)


@register_model(SIMPLE_CNN, default_input=(1, 28, 28), notes="1,413,834 parameters at 10 classes (Keras summary of the same model).")
def simple_cnn(**kwargs) -> SimpleCNN:
    kwargs.setdefault("num_classes", 10)
    return SimpleCNN(**kwargs)


@register_model(SIMPLE_CNN, default_input=(1, 28, 28), notes="simple_cnn with batch norm after every conv: trains faster.")
def simple_cnn_bn(**kwargs) -> SimpleCNN:
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("norm_layer", nn.BatchNorm2d)
    return SimpleCNN(**kwargs)
