"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998, "Gradient-based learning applied to document recognition", Fig. 2).

Layer table of the paper (input 1x32x32)::

    C1  conv 5x5, 6 maps     -> 6@28x28     156 params
    S2  2x2 subsampling      -> 6@14x14      12 params (a trainable coefficient and bias per map)
    C3  conv 5x5, 16 maps    -> 16@10x10  1,516 params (a sparse connection table, paper Table I)
    S4  2x2 subsampling      -> 16@5x5       32 params
    C5  conv 5x5, 120 maps   -> 120@1x1  48,120 params
    F6  full, 84 units                   10,164 params
    output: 10 Euclidean RBF units (fixed, hand-designed weights)

The per-layer counts the paper gives in §II.B (the column above) sum to 60,000, the
figure usually quoted for LeNet-5.

cnnlab keeps the layer sizes and the tanh/average-pooling character but simplifies three
things, as most textbook versions do: C3 sees all 6 maps of S2 (2,416 params instead of
1,516), S2/S4 are plain average pools (no trainable coefficient), and the output is a
linear layer (850 params) instead of the RBF units. Total: 61,706 parameters at 10 classes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.layers import ConvNormAct, init_weights
from cnnlab.models.base import Classifier, FeatureInfo
from cnnlab.models.registry import Family, overwrite_param, register_model

LENET = Family(
    name="LeNet",
    paper="LeCun, Bottou, Bengio & Haffner, Gradient-based learning applied to document recognition",
    year=1998,
    url="http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf",
)


@dataclass(frozen=True)
class LeNetStage:
    """A 'valid' convolution, the activation, then (optionally) 2x2 subsampling."""

    out_channels: int
    kernel_size: int = 5
    subsample: bool = True


# LeCun et al. 1998, Fig. 2: C1+S2, C3+S4, C5 (C5 is a conv so a larger input still works).
LENET5_STAGES = (LeNetStage(6), LeNetStage(16), LeNetStage(120, subsample=False))


def lecun1998_init(model: nn.Module) -> None:
    """LeCun et al. 1998, Appendix C: weights uniform in +-2.4/F_i (F_i the unit's fan-in), so the
    scaled tanh starts in its linear range. The paper says nothing separate of biases: they start at 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LeNet(Classifier):
    """LeNet: 'valid' convs with subsampling, then a fully connected layer and the classifier.

    Args:
        stages: conv stages (C1/S2, C3/S4, C5 for LeNet-5).
        hidden: width of the fully connected layer F6 (84).
        act_layer: tanh in the paper (a scaled tanh, 1.7159 tanh(2a/3)); ``nn.ReLU`` for a modern take.
        pool_layer: the subsampling, average pooling in the paper; ``nn.MaxPool2d`` works too.
        init: ``"reference"`` (the paper's, Appendix C: weights U(-2.4/F, 2.4/F), F the fan-in; no library
            has LeNet-5), ``"xavier"`` (Glorot, suited to tanh), ``"kaiming"`` or ``"none"``.
    """

    head_name = "fc"
    min_input_size = 32  # 32 -> C1 28 -> S2 14 -> C3 10 -> S4 5 -> C5 1; a 31x31 input leaves C5 nothing

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        stages: tuple[LeNetStage, ...] = LENET5_STAGES,
        hidden: int = 84,
        act_layer: Callable[..., nn.Module] = nn.Tanh,
        pool_layer: Callable[..., nn.Module] = nn.AvgPool2d,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        layers: list[nn.Module] = []
        channels, stride = in_channels, 1
        for i, stage in enumerate(stages):
            block = ConvNormAct(channels, stage.out_channels, stage.kernel_size, padding=0, norm_layer=None, act_layer=act_layer)
            if stage.subsample:
                block.add_module("pool", pool_layer(2))
                stride *= 2
            channels = stage.out_channels
            layers.append(block)
            self.feature_info.append(FeatureInfo(f"stages.{i}", channels, stride))
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # the identity at 32x32, where C5 is 1x1
        self.fc6 = nn.Linear(channels, hidden)
        self.act = act_layer()
        self.fc: nn.Module = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = hidden
        init_weights(self, init, lecun1998_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, 1, 32, 32) -> (B, 120, 1, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.fc6(torch.flatten(self.pool(x), 1)))  # (B, 120) -> F6 (B, 84)
        return x if pre_logits else self.fc(x)


@register_model(
    LENET,
    default_input=(1, 32, 32),
    notes="61,706 parameters at 10 classes; the paper's LeNet-5 has 60,000 (sum of LeCun 1998 §II.B's layer counts): "
    "cnnlab's C3 is fully connected (+900), its subsampling has no trainable coefficients (-44) "
    "and its output is a linear layer (+850) instead of fixed RBF units.",
)
def lenet5(**kwargs) -> LeNet:
    overwrite_param(kwargs, "stages", LENET5_STAGES)
    return LeNet(**kwargs)
