"""Spatial pyramid pooling (He et al. 2014, "Spatial Pyramid Pooling in Deep Convolutional Networks").

A feature map of any size is max-pooled into a fixed pyramid of ``l x l`` grids, one per level, and the
grids are flattened and concatenated: a vector of length ``C * sum(l**2)`` whatever ``H x W`` was. That is
what lets SPP-net feed the fully connected layers from a window of any size, so the conv layers run once
per image instead of once per region (R-CNN).

- :class:`SpatialPyramidPooling` pools whole feature maps (classification at any input size).
- :func:`spp_roi_pool` pools regions of a feature map (detection): each level is one
  ``torchvision.ops.roi_pool`` call, whose bins are the same ``floor``/``ceil`` partition as
  ``adaptive_max_pool2d`` applied to the region's window of cells.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from cnnlab._errors import CnnlabError

# The paper's detection pyramid: 1x1, 2x2, 3x3, 6x6 (50 bins) on conv5 of ZF-5.
DETECTION_LEVELS = (1, 2, 3, 6)


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(not isinstance(level, int) or level < 1 for level in levels):
        raise CnnlabError(f"SPP levels must be a non-empty sequence of positive ints such as (1, 2, 4), got {levels!r}")
    return levels


def spp_output_size(channels: int, levels: Sequence[int]) -> int:
    """Length of the pooled vector: ``channels * sum(l**2 for l in levels)``."""
    return channels * sum(level * level for level in _check_levels(levels))


class SpatialPyramidPooling(nn.Module):
    """Max-pool a (B, C, H, W) map into each ``l x l`` grid of ``levels`` and concatenate: (B, C * sum(l**2)).

    The vector is ordered level by level, each level flattened as (C, l, l). Any H x W works (a level finer
    than the map repeats cells, as adaptive pooling does).

    Args:
        levels: the pyramid's grid sizes, e.g. (1, 2, 4) (21 bins; the paper's classification nets used
            {1, 2, 3, 6} and {1, 2, 4}).
        mode: ``"max"`` (the paper) or ``"avg"``.
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        if mode not in ("max", "avg"):
            raise CnnlabError(f"SpatialPyramidPooling mode must be 'max' or 'avg', got {mode!r}")
        self.mode = mode

    def output_size(self, channels: int) -> int:
        return spp_output_size(channels, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise CnnlabError(f"SpatialPyramidPooling expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
        pool = F.adaptive_max_pool2d if self.mode == "max" else F.adaptive_avg_pool2d
        # (B, C, H, W) -> per level (B, C, l, l) -> (B, C*l*l); concatenated: (B, C * sum(l**2))
        return torch.cat([torch.flatten(pool(x, level), 1) for level in self.levels], dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"


def spp_roi_pool(
    features: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    levels: Sequence[int] = DETECTION_LEVELS,
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    """Pool every region of ``features`` into the spatial pyramid: (K, C * sum(l**2)).

    A region is projected onto the feature map by ``spatial_scale`` (1 / the map's stride) and rounded to
    whole cells, as the paper's window projection; each level is a max over an ``l x l`` partition of that
    window (``torchvision.ops.roi_pool``).

    Args:
        features: (B, C, H, W) feature map.
        rois: (K, 5) rows ``(batch_index, x1, y1, x2, y2)``, or one (K_i, 4) xyxy tensor per image.
        levels: the pyramid's grid sizes.
        spatial_scale: feature-map cells per input pixel (1 / stride).
    """
    levels = _check_levels(levels)
    if features.ndim != 4:
        raise CnnlabError(f"spp_roi_pool expects a (B, C, H, W) feature map, got shape {tuple(features.shape)}")
    if isinstance(rois, torch.Tensor) and (rois.ndim != 2 or rois.shape[1] != 5):
        raise CnnlabError(f"spp_roi_pool expects rois of shape (K, 5) (batch index, x1, y1, x2, y2) or a list of "
                          f"(K_i, 4) boxes, got shape {tuple(rois.shape)}")
    features = features.float()  # torchvision's CPU roi_pool has no bf16 kernel (autocast: bf16 maps, float boxes)
    pooled = [torch.flatten(roi_pool(features, rois, output_size=level, spatial_scale=spatial_scale), 1)
              for level in levels]  # each (K, C, l, l) -> (K, C*l*l)
    return torch.cat(pooled, dim=1)


class SPPRoIPool(nn.Module):
    """:func:`spp_roi_pool` as a module with the call signature of ``torchvision.ops.MultiScaleRoIAlign``.

    ``forward(features: dict[str, Tensor], proposals: list[Tensor[N, 4]], image_shapes)`` pools the
    proposals of each image from the feature map named ``featmap_name``; the map's stride is inferred from
    its size and the (padded) batch's image size, as MultiScaleRoIAlign does, unless ``spatial_scale`` is given.

    Args:
        levels: the pyramid's grid sizes.
        featmap_name: which entry of the features dict to pool.
        spatial_scale: 1 / stride of that map; None infers it per call.
    """

    def __init__(self, levels: Sequence[int] = DETECTION_LEVELS, featmap_name: str = "0",
                 spatial_scale: float | None = None) -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        self.featmap_name = featmap_name
        self.spatial_scale = spatial_scale

    def output_size(self, channels: int) -> int:
        return spp_output_size(channels, self.levels)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        if self.featmap_name not in features:
            raise CnnlabError(f"SPPRoIPool: no feature map named {self.featmap_name!r}; the backbone returned "
                              f"{list(features)}")
        x = features[self.featmap_name]
        scale = self.spatial_scale
        if scale is None:
            # as MultiScaleRoIAlign: the map's size over the largest image's size, rounded to a power of 2
            largest = max(shape[0] for shape in image_shapes)
            scale = 2.0 ** round(math.log2(x.shape[-2] / largest))
        return spp_roi_pool(x, proposals, self.levels, scale)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, featmap_name={self.featmap_name!r}, spatial_scale={self.spatial_scale}"
