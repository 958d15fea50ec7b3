"""From a list of images of any sizes to one padded batch, and the detections back to each image's size.

:class:`DetectionTransform` does what torchvision's ``GeneralizedRCNNTransform`` does, with the same
arithmetic (so the oracle tests can compare outputs to 1e-4): normalise each image by the ImageNet
mean and std, rescale it so that its short side is ``min_size`` unless its long side would then pass
``max_size`` (Faster R-CNN's "shorter side 600, longer at most 1000"), rescale the target boxes alike,
and zero-pad the batch to a multiple of ``size_divisible`` (the backbone's largest stride).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError

__all__ = ["ImageList", "DetectionTransform", "resize_boxes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageList:
    """A padded batch (B, C, H, W) and the size (h, w) of each image inside it before padding."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]

    def to(self, device: torch.device) -> ImageList:
        return ImageList(self.tensors.to(device), self.image_sizes)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale (N, 4) x1, y1, x2, y2 boxes from an image of ``original_size`` (h, w) to one of ``new_size``."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=boxes.device) / original_size[0]
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=boxes.device) / original_size[1]
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class DetectionTransform(nn.Module):
    """Normalise, resize and batch detection inputs; map detections back to the input sizes.

    Args:
        min_size: the short side after resizing; a sequence means one size drawn per image in training
            (multi-scale training; the last one is used in eval).
        max_size: the most the long side may be after resizing.
        image_mean, image_std: per-channel normalisation (defaults: ImageNet's).
        size_divisible: the padded batch's height and width are multiples of this.
        fixed_size: resize every image to this (width, height) instead.
        fixed_scale: rescale every image by this factor instead of ``min_size``/``max_size`` (1.0 keeps each image
            at its own pixels: imagery with a fixed ground resolution, such as aerial tiles trained on and a larger
            scene evaluated on, where a per-image short side would change the objects' scale between the two).
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        size_divisible: int = 32,
        fixed_size: tuple[int, int] | None = None,
        fixed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        if not self.min_size or any(int(s) != s or s < 1 for s in self.min_size) or max_size < 1:
            raise CnnlabError(f"min_size must be a positive int (or a list of them) and max_size a positive int, "
                              f"got min_size={min_size}, max_size={max_size}")
        self.max_size = max_size
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_STD)
        if len(self.image_mean) != len(self.image_std):
            raise CnnlabError(f"image_mean {self.image_mean} and image_std {self.image_std} must have one value per channel")
        self.size_divisible = size_divisible
        if fixed_scale is not None and (isinstance(fixed_scale, bool) or not fixed_scale > 0 or fixed_size):
            raise CnnlabError(f"fixed_scale must be a positive factor (1.0: keep each image's size), without "
                              f"fixed_size; got fixed_scale={fixed_scale!r}, fixed_size={fixed_size!r}")
        self.fixed_size = fixed_size
        self.fixed_scale = None if fixed_scale is None else float(fixed_scale)

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """Images (C, H, W) in 0..1 and optional targets -> the padded batch and the resized targets."""
        targets_out = [dict(t) for t in targets] if targets is not None else None  # never edit the caller's dicts
        resized = []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.ndim != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise CnnlabError(f"images[{i}] must be a (C, H, W) tensor, got {shape}")
            if not image.is_floating_point():
                raise CnnlabError(f"images[{i}] must be a float tensor in 0..1, got {image.dtype} "
                                  "(convert with torchvision.transforms.functional.convert_image_dtype)")
            if image.shape[0] != len(self.image_mean):
                raise CnnlabError(f"images[{i}] has {image.shape[0]} channels; this model normalises "
                                  f"{len(self.image_mean)} (image_mean={self.image_mean})")
            image = self.normalize(image)
            h, w = image.shape[-2:]
            image = self.resize(image)
            if targets_out is not None:
                boxes = targets_out[i]["boxes"].to(image.dtype)  # float64 boxes would not meet float32 anchors
                targets_out[i]["boxes"] = resize_boxes(boxes, (h, w), image.shape[-2:])
            resized.append(image)
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized]
        return ImageList(self.batch_images(resized), image_sizes), targets_out

    def normalize(self, image: Tensor) -> Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _choose_min_size(self) -> int:
        if not self.training:
            return self.min_size[-1]
        # drawn from torch's RNG, one draw per image even with one size, as torchvision does: seeding
        # torch then gives both libraries the same sizes and the same samplers' draws afterwards
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor) -> Tensor:
        """Rescale (C, H, W) so the short side is ``min_size`` and the long side at most ``max_size``."""
        min_size = self._choose_min_size()
        if self.fixed_scale == 1.0:
            return image
        if self.fixed_size is not None:
            size, scale, recompute = [self.fixed_size[1], self.fixed_size[0]], None, None
        elif self.fixed_scale is not None:
            size, scale, recompute = None, self.fixed_scale, True
        else:
            h, w = image.shape[-2:]
            size, scale, recompute = None, min(min_size / min(h, w), self.max_size / max(h, w)), True
        return F.interpolate(image[None], size=size, scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=recompute, align_corners=False)[0]

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad to the largest height and width, rounded up to ``size_divisible``: (B, C, H, W)."""
        channels = max(im.shape[0] for im in images)
        height = int(math.ceil(max(im.shape[1] for im in images) / self.size_divisible) * self.size_divisible)
        width = int(math.ceil(max(im.shape[2] for im in images) / self.size_divisible) * self.size_divisible)
        batch = images[0].new_zeros((len(images), channels, height, width))
        for im, slot in zip(images, batch):
            slot[: im.shape[0], : im.shape[1], : im.shape[2]].copy_(im)
        return batch

    def postprocess(
        self, detections: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Scale each image's ``boxes`` from the resized size back to the input image's size."""
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
        return detections

    def extra_repr(self) -> str:
        return (f"mean={self.image_mean}, std={self.image_std}, min_size={self.min_size}, max_size={self.max_size}, "
                f"size_divisible={self.size_divisible}")
