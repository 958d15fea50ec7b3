"""Up-sampling blocks for decoders: learned (transposed conv) or fixed (interpolation) then a conv.

``UpsampleConv(in_channels, out_channels, factor, mode)`` multiplies H and W by ``factor``:

- ``mode="transposed"``: one ``ConvTranspose2d`` with kernel ``2 * factor``, stride ``factor``, padding
  ``ceil(factor / 2)`` and output padding ``factor % 2`` (the size formula then gives exactly ``factor * d``). Learned, but with stride > 1 its kernel
  overlaps itself unevenly or, with random weights, puts different weights at different output phases: the
  *checkerboard* artefact of Odena et al. (Distill 2016).
- ``mode="bilinear"`` / ``"nearest"``: ``F.interpolate`` (no parameters), then a 3x3 conv (resize-then-conv):
  every output pixel sees the same kernel, so a flat input gives a flat output.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError

UPSAMPLE_MODES = ("transposed", "bilinear", "nearest")


class UpsampleConv(nn.Module):
    """Up-sample by ``factor`` and map ``in_channels`` to ``out_channels``.

    Args:
        in_channels, out_channels: channels before and after.
        factor: integer scale of H and W (>= 2).
        mode: ``transposed`` (learned), ``bilinear`` or ``nearest`` (interpolation, then a 3x3 conv).
        bias: whether the conv has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, mode: str = "bilinear",
                 bias: bool = True) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise CnnlabError(f"up-sampling mode must be one of {', '.join(UPSAMPLE_MODES)}, got {mode!r}")
        if not isinstance(factor, int) or factor < 2:
            raise CnnlabError(f"factor must be an integer >= 2, got {factor!r}")
        self.factor, self.mode = factor, mode
        if mode == "transposed":
            self.conv = nn.ConvTranspose2d(in_channels, out_channels, 2 * factor, stride=factor, padding=(factor + 1) // 2,
                                           output_padding=factor % 2, bias=bias)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "transposed":
            return self.conv(x)  # (B, C, H, W) -> (B, C', factor*H, factor*W)
        align = {"align_corners": False} if self.mode == "bilinear" else {}
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode=self.mode, **align))
