"""Anchors: the reference boxes the RPN scores and refines at every feature-map position.

Ren et al. 2015, §3.1: at each sliding-window position, k = (scales x aspect ratios) anchors
centred on it (the paper: 3 scales 128², 256², 512² and ratios 1:2, 1:1, 2:1 on one stride-16 map).
With an FPN each level gets its own sizes (32 on P2 ... 512 on P6, one size and three ratios per level).
An aspect ratio is height / width, as in torchvision; an anchor of size s and ratio r has the area s².
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.detection.transform import ImageList

__all__ = ["AnchorGenerator"]


def _per_level(value: Sequence, name: str) -> tuple[tuple[float, ...], ...]:
    """``(32, 64)`` means one size per level; ``((32, 64),)`` several on one level."""
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise CnnlabError(f"{name} must be a non-empty tuple (one entry per feature map), got {value!r}")
    if not isinstance(value[0], (list, tuple)):
        value = tuple((v,) for v in value)
    out = tuple(tuple(float(v) for v in level) for level in value)
    if any(len(level) == 0 or min(level) <= 0 for level in out):
        raise CnnlabError(f"{name} must hold positive numbers for every feature map, got {value!r}")
    return out


class AnchorGenerator(nn.Module):
    """Anchors for every position of every feature map, per image.

    Args:
        sizes: per feature map, the anchor sizes (square root of the area, in input pixels), e.g.
            ``((32,), (64,), (128,), (256,), (512,))`` for an FPN or ``((128, 256, 512),)`` for one map.
        aspect_ratios: per feature map, the height/width ratios; one tuple is used for every map.
    """

    def __init__(
        self,
        sizes: Sequence = ((128, 256, 512),),
        aspect_ratios: Sequence = ((0.5, 1.0, 2.0),),
    ) -> None:
        super().__init__()
        self.sizes = _per_level(sizes, "anchor_sizes")
        ratios = aspect_ratios
        if isinstance(ratios, (list, tuple)) and ratios and not isinstance(ratios[0], (list, tuple)):
            ratios = (tuple(ratios),) * len(self.sizes)
        elif isinstance(ratios, (list, tuple)) and len(ratios) == 1 and len(self.sizes) > 1:
            ratios = tuple(ratios) * len(self.sizes)
        self.aspect_ratios = _per_level(ratios, "aspect_ratios")
        if len(self.aspect_ratios) != len(self.sizes):
            raise CnnlabError(f"anchor_sizes has {len(self.sizes)} entries (feature maps) but aspect_ratios has "
                              f"{len(self.aspect_ratios)}; give one tuple of ratios per feature map, or one for all")
        self.cell_anchors = [self.generate_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def generate_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                         dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(ratios) * len(sizes), 4) anchors centred on (0, 0), corners rounded to whole pixels."""
        scales = torch.as_tensor(sizes, dtype=dtype)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype)
        h_ratios = torch.sqrt(ratios)  # h / w = r with h * w = s²: h = s sqrt(r), w = s / sqrt(r)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # ratio-major order, as torchvision
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per feature map, (H * W * A, 4) anchors: every cell anchor shifted to every position."""
        anchors = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w
            shifts_y = torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))  # position-major
        return anchors

    def forward(self, images: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """One (sum over maps of H * W * A, 4) tensor of anchors per image, in input-batch pixels."""
        if len(feature_maps) != len(self.sizes):
            raise CnnlabError(
                f"anchor_sizes has {len(self.sizes)} entries but the backbone gives {len(feature_maps)} feature "
                f"maps; give one tuple of sizes per feature map (e.g. anchor_sizes={self._example(len(feature_maps))})"
            )
        image_h, image_w = images.tensors.shape[-2:]
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        strides = [(image_h // g[0], image_w // g[1]) for g in grid_sizes]
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides, feature_maps[0].dtype, feature_maps[0].device))
        return [anchors for _ in images.image_sizes]

    @staticmethod
    def _example(levels: int) -> str:
        return "(" + ", ".join(f"({32 * 2 ** i},)" for i in range(levels)) + ("," if levels == 1 else "") + ")"
