"""DenseNet's blocks (Huang et al., 2017): dense layer, dense block, transition.

Every layer of a dense block sees the concatenation of all earlier feature maps and adds
``growth_rate`` new ones, so a block with ``L`` layers turns ``C`` channels into ``C + L*k``.
The convolutions are pre-activation (BN-ReLU-Conv), as in the paper.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import checkpoint

from cnnlab.layers.conv import make_act

LayerFactory = Callable[..., nn.Module]


class NormActConv(nn.Sequential):
    """Pre-activation convolution: norm, activation, then a bias-free conv (children ``norm``, ``act``, ``conv``).

    Args:
        in_channels, out_channels, kernel_size, stride: as in Conv2d ("same" padding).
        norm_layer, act_layer: factories (called with the channel count / with no argument).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.norm = norm_layer(in_channels)
        self.act = make_act(act_layer)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)


class DenseLayer(nn.Module):
    """One layer of a dense block: ``[x_0, ..., x_{l-1}] -> H_l(concat) = k new maps``.

    DenseNet-B: ``conv1`` is the 1x1 bottleneck to ``bn_size * k`` maps, ``conv2`` the 3x3 conv to
    ``k`` maps, both BN-ReLU-Conv (paper §3, "Bottleneck layers"). ``bn_size=0`` drops the
    bottleneck (plain DenseNet: BN-ReLU-3x3 conv only).

    Args:
        in_channels: channels of the concatenated input.
        growth_rate: ``k``, the maps this layer adds.
        bn_size: bottleneck width as a multiple of ``k`` (4 in the paper); 0 for no bottleneck.
        drop_rate: dropout on the new maps (the paper uses 0.2 without data augmentation).
        memory_efficient: recompute the concatenation and bottleneck in the backward pass
            instead of storing them (Pleiss et al., 2017), trading compute for memory.
        norm_layer, act_layer: factories.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        inner = bn_size * growth_rate if bn_size > 0 else in_channels
        self.conv1: nn.Module = nn.Identity()
        if bn_size > 0:
            self.conv1 = NormActConv(in_channels, inner, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = NormActConv(inner, growth_rate, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.cat(features, 1))  # the concatenation is the memory hog of DenseNet

    def forward(self, features: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            features = [features]
        if self.memory_efficient and self.training and any(f.requires_grad for f in features):
            x = checkpoint.checkpoint(self._bottleneck, *features, use_reentrant=False)
        else:
            x = self._bottleneck(*features)
        x = self.conv2(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; the output concatenates the input and every layer's maps.

    (B, C, H, W) -> (B, C + num_layers * growth_rate, H, W). Options as in ``DenseLayer``.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient, norm_layer, act_layer)
            for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(NormActConv):
    """Between dense blocks: BN-ReLU-1x1 conv to ``out_channels``, then 2x2 average pooling (stride 2).

    DenseNet-C compresses with ``out_channels = floor(theta * in_channels)``, theta = 0.5.
    A 1x1 ``NormActConv`` (children ``norm``, ``act``, ``conv``) followed by ``pool``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.out_channels = out_channels
