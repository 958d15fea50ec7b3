"""Mobile blocks: the depthwise separable block (MobileNet v1) and the inverted residual / MBConv
block (MobileNet v2, MnasNet, EfficientNet)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnlab.layers.conv import ConvNormAct, LayerFactory
from cnnlab.layers.drop import DropPath


class DepthwiseSeparableBlock(nn.Module):
    """MobileNet v1's block (Howard et al. 2017, Fig. 3): depthwise KxK + BN + act, pointwise 1x1 + BN + act.

    A standard KxK conv from C to N channels costs ``K²·C·N·H·W`` multiply-adds; this block
    costs ``K²·C·H·W + C·N·H·W``, i.e. ``1/N + 1/K²`` of it (8-9x fewer for K=3).

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: the depthwise kernel (3 in MobileNet v1).
        stride: stride of the depthwise conv (the pointwise conv is always stride 1).
        norm_layer, act_layer: factories for the norm after each conv and the activation.

    Children: ``dw`` and ``pw``, each a ConvNormAct (``conv``/``norm``/``act``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.dw = ConvNormAct(in_channels, in_channels, kernel_size, stride, groups=in_channels,
                              norm_layer=norm_layer, act_layer=act_layer)
        self.pw = ConvNormAct(in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))  # (B, C, H, W) -> (B, C, H/s, W/s) -> (B, N, H/s, W/s)


class MBConv(nn.Module):
    """Inverted residual with linear bottleneck (Sandler et al. 2018, Table 1), a.k.a. MBConv.

    ``x -> 1x1 expand (x expand_ratio) + BN + act -> KxK depthwise + BN + act -> [attention]
    -> 1x1 project + BN (linear: no activation) -> + x`` (the residual only when stride is 1
    and the channels match). ``expand_ratio == 1`` drops the expansion conv (MobileNet v2's
    first block, MnasNet's and EfficientNet's MBConv1).

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: the depthwise kernel (3 or 5).
        stride: stride of the depthwise conv.
        expand_ratio: width of the hidden layer as a multiple of ``in_channels`` (``t`` in the paper).
        norm_layer, act_layer: factories (ReLU6 in MobileNet v2, ReLU in MnasNet, SiLU in EfficientNet).
        attn_layer: attention on the expanded features, e.g. ``SqueezeExcite``; it is called as
            ``attn_layer(hidden_channels, rd_channels=...)``. None for no attention.
        attn_ratio: the attention bottleneck as a fraction of the block's *input* channels
            (0.25 in EfficientNet and MnasNet-A1, i.e. ``in_channels // 4``).
        drop_path: stochastic-depth probability of the residual branch (only with a residual).

    Children: ``expand`` (absent when ``expand_ratio == 1``), ``dw``, ``attn``, ``project``,
    ``drop_path``; the convs are ConvNormAct (``conv``/``norm``/``act``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 6,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU6,
        attn_layer: Callable[..., nn.Module] | None = None,
        attn_ratio: float = 0.25,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.has_residual = stride == 1 and in_channels == out_channels
        if hidden != in_channels:
            self.expand = ConvNormAct(in_channels, hidden, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.dw = ConvNormAct(hidden, hidden, kernel_size, stride, groups=hidden, norm_layer=norm_layer,
                              act_layer=act_layer)
        # SE's bottleneck follows the block input, not the expanded width (EfficientNet's reference code).
        self.attn = (attn_layer(hidden, rd_channels=max(1, int(in_channels * attn_ratio)))
                     if attn_layer is not None else nn.Identity())
        self.project = ConvNormAct(hidden, out_channels, 1, norm_layer=norm_layer, act_layer=None)
        self.drop_path = DropPath(drop_path) if self.has_residual and drop_path > 0 else nn.Identity()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "expand"):
            out = self.expand(out)  # (B, C, H, W) -> (B, tC, H, W)
        out = self.project(self.attn(self.dw(out)))  # -> (B, tC, H/s, W/s) -> (B, C', H/s, W/s)
        if self.has_residual:
            out = self.drop_path(out) + x
        return out

    def zero_init_last(self) -> None:
        """Start the block as the identity (used by ``zero_init_last_norm``); only blocks with a residual."""
        norm = getattr(self.project, "norm", None)
        if self.has_residual and norm is not None and getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)
