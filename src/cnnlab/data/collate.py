"""Collate functions for images of different sizes, and moving such batches to a device.

Detection batches stay lists (torchvision's detection interface: each model batches inside its own
transform); segmentation batches are padded to one size (images with 0, masks with the ignore index, so
the padding counts in no loss or metric) and stacked. The collates are picklable callables, so they work in
``DataLoader`` workers under fork and spawn alike, and return plain tensors: ``tv_tensors`` are unwrapped in
the worker, before the batch crosses the process boundary and before ``pin_memory``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError


def _plain(value: Any) -> Any:
    """tv_tensors (Image, BoundingBoxes, Mask) -> torch.Tensor; containers recursively; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _pairs(batch: Sequence[Any], what: str) -> tuple[list[Any], list[Any]]:
    if not batch:
        raise CnnlabError(f"{what} collate got an empty batch")
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise CnnlabError(f"{what} collate expects (image, target) items, got {type(item).__name__}")
    return [item[0] for item in batch], [item[1] for item in batch]


def collate_detection(batch: Sequence[tuple[Any, dict]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``(list of C x H x W tensors, list of target dicts)``, sizes untouched."""
    images, targets = _pairs(batch, "detection")
    return [_plain(im) for im in images], [_plain(t) for t in targets]


class SegmentationCollate:
    """``[(image, {"mask": Mask, ...}), ...]`` -> ``(images B x C x H x W, masks B x H x W int64)``.

    Args:
        ignore_index: the value padded mask pixels get (VOC's 255).
        size_divisor: pad H and W up to a multiple of this (a network of output stride 32 wants 32), bottom
            and right, so the original pixels keep their coordinates.
        stack: False returns lists (images and masks at their own sizes) for models that take lists.
    """

    def __init__(self, ignore_index: int = 255, size_divisor: int = 1, stack: bool = True) -> None:
        if not isinstance(size_divisor, int) or isinstance(size_divisor, bool) or size_divisor < 1:
            raise CnnlabError(f"size_divisor must be a positive integer, got {size_divisor!r}")
        self.ignore_index, self.size_divisor, self.stack = ignore_index, size_divisor, stack

    def __call__(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        images, targets = _pairs(batch, "segmentation")
        images = [_plain(im) for im in images]
        masks = [_plain(t["mask"] if isinstance(t, Mapping) else t).long() for t in targets]
        for im, m in zip(images, masks):
            if tuple(m.shape[-2:]) != tuple(im.shape[-2:]):
                raise CnnlabError(f"a mask of size {tuple(m.shape[-2:])} came with an image of size "
                                  f"{tuple(im.shape[-2:])}; masks must have their image's H x W")
        if not self.stack:
            return images, masks
        d = self.size_divisor
        height = math.ceil(max(im.shape[-2] for im in images) / d) * d
        width = math.ceil(max(im.shape[-1] for im in images) / d) * d

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:  # (..., h, w) -> (..., height, width)
            return F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

        return (torch.stack([pad(im, 0) for im in images]),
                torch.stack([pad(m, self.ignore_index) for m in masks]))


collate_segmentation = SegmentationCollate()


def batch_to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Every tensor of a (nested) batch -> ``device``; lists, tuples and dicts keep their shape, other values
    (image ids) stay. ``non_blocking`` overlaps the copy with compute when the loader pins memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: batch_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to_device(v, device, non_blocking) for v in batch)
    return batch
