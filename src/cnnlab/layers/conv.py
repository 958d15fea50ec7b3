"""Convolution building blocks shared by every model."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LayerFactory = Callable[..., nn.Module]


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution: ``(N + 2P - D(F-1) - 1) // S + 1``.

    With dilation 1 this is the notes' ``(N + 2P - F) / S + 1``.
    """
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def conv_transpose_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1, output_padding: int = 0
) -> int:
    """Output length of a transposed convolution (PyTorch's ConvTranspose2d formula)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Symmetric padding that keeps the size at stride 1 ("same") for odd kernels."""
    return dilation * (kernel_size - 1) // 2


class ConvNormAct(nn.Sequential):
    """Conv2d, then a normalisation layer, then an activation.

    Children are named ``conv``, ``norm``, ``act`` (absent when the factory is None),
    so state_dict keys read ``...conv.weight``, ``...norm.running_mean``.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as in Conv2d.
        padding: an int, ``"same"`` or ``None`` (= "same" padding for the kernel).
        bias: None means "bias only when there is no norm layer".
        norm_layer: factory called with the channel count, or None.
        act_layer: factory called with no argument (``inplace=True`` tried first), or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU,
    ) -> None:
        super().__init__()
        if padding is None or padding == "same":
            k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            if isinstance(kernel_size, tuple):
                padding = tuple(same_padding(k_, dilation) for k_ in kernel_size)
            else:
                padding = same_padding(k, dilation)
        elif padding == "valid":
            padding = 0
        if bias is None:
            bias = norm_layer is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        if norm_layer is not None:
            self.norm = norm_layer(out_channels)
        if act_layer is not None:
            self.act = make_act(act_layer)
        self.out_channels = out_channels


def make_act(act_layer: LayerFactory) -> nn.Module:
    """Instantiate an activation factory, in place where the layer supports it."""
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class SeparableConv2d(nn.Sequential):
    """Depthwise separable convolution: a per-channel (depthwise) KxK conv, then a 1x1 (pointwise) conv.

    Costs ``1/N + 1/K²`` of a standard KxK conv's multiply-adds (MobileNet, Xception).
    Children: ``depthwise`` and ``pointwise`` (plain convs; compose with norm/act outside).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels, bias=bias
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor``, never below 90% of ``value``.

    The rule MobileNet v2, MnasNet and EfficientNet use for width multipliers.
    """
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, g*n, H, W) -> view (B, g, n) -> transpose -> flatten."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)
