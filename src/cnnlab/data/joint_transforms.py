"""Augmentation that moves boxes and masks with the image: ``torchvision.transforms.v2`` pipelines from a config.

torchvision's v2 transforms dispatch on ``tv_tensors`` (``Image``, ``BoundingBoxes``, ``Mask``), so one flip or
crop moves all three, resizes masks with nearest neighbours and keeps per-box fields aligned; cnnlab writes
no box arithmetic of its own. The order follows torchvision's ``references/detection/presets.py`` (photometric,
zoom out, IoU crop, flip) and ``references/segmentation/presets.py`` (random resize, flip, crop padded with the
ignore index). The tensor-resident classification sets keep ``cnnlab.data.augment`` (batched, on the device).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2 as T
from torchvision import tv_tensors

from cnnlab._errors import CnnlabError, did_you_mean

# Per-box fields that must be dropped together with the boxes SanitizeBoundingBoxes removes.
PER_BOX_FIELDS = ("labels", "iscrowd", "area", "difficult")


@dataclass(frozen=True)
class JointAugment:
    """What augmentation a detection or segmentation pipeline applies (training; evaluation resizes only).

    Args:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip (aerial and microscope images have no "up").
        photometric: probability of ``RandomPhotometricDistort`` (brightness, contrast, saturation, hue).
        zoom_out: probability of ``RandomZoomOut`` (SSD's expansion, canvas up to ``zoom_out_max`` times).
        iou_crop: SSD's ``RandomIoUCrop`` (crops keeping boxes at a minimum IoU); detection only.
        scale: (lo, hi) zoom factor drawn per image, the canvas kept (``RandomAffine(scale=...)``, ultralytics'
            ``scale``): below 1 the image shrinks inside a ``fill`` border, above 1 it is cropped; or None.
        random_resize: (min, max) shorter side drawn per image (multi-scale training), or None.
        resize: shorter side (int) or exact (H, W) after augmentation, also at evaluation; None keeps the size.
        max_size: longer-side cap when ``resize`` is an int.
        crop: (H, W) random crop, padded where the image is smaller (masks with the ignore index).
        fill: the image's padding value (0..255) for zoom-out and crops.
        min_box_size: boxes narrower or shorter than this many pixels (or under 1 px^2) after augmentation
            are dropped in training (>= 1).
    """

    hflip: float = 0.5
    vflip: float = 0.0
    photometric: float = 0.0
    zoom_out: float = 0.0
    zoom_out_max: float = 4.0
    iou_crop: bool = False
    scale: tuple[float, float] | None = None
    random_resize: tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    max_size: int | None = None
    crop: tuple[int, int] | None = None
    fill: int = 0
    min_box_size: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "photometric", "zoom_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise CnnlabError(f"augment.{name} must be a probability in [0, 1], got {value!r}")
        if not isinstance(self.zoom_out_max, (int, float)) or self.zoom_out_max < 1.0:
            raise CnnlabError(f"augment.zoom_out_max must be >= 1 (the canvas's size over the image's), "
                              f"got {self.zoom_out_max!r}")
        if not isinstance(self.iou_crop, bool):
            raise CnnlabError(f"augment.iou_crop must be true or false, got {self.iou_crop!r}")
        if self.scale is not None:
            ok = (isinstance(self.scale, (tuple, list)) and len(self.scale) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.scale))
            if not ok or not 0 < self.scale[0] <= self.scale[1]:
                raise CnnlabError(f"augment.scale must be (lo, hi) zoom factors with 0 < lo <= hi, got {self.scale!r}")
        _check_pair(self.random_resize, "random_resize", ordered=True)
        if isinstance(self.resize, int) and not isinstance(self.resize, bool):
            if self.resize <= 0:
                raise CnnlabError(f"augment.resize must be a positive shorter side or (H, W), got {self.resize}")
        else:
            _check_pair(self.resize, "resize")
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size <= 0
                                          or not isinstance(self.resize, int)):
            raise CnnlabError(f"augment.max_size must be a positive integer and needs an integer resize, "
                              f"got max_size={self.max_size!r}, resize={self.resize!r}")
        _check_pair(self.crop, "crop")
        if isinstance(self.fill, bool) or not isinstance(self.fill, int) or not 0 <= self.fill <= 255:
            raise CnnlabError(f"augment.fill must be an integer in 0..255, got {self.fill!r}")
        if isinstance(self.min_box_size, bool) or not isinstance(self.min_box_size, (int, float)) \
                or self.min_box_size < 1:  # torchvision's SanitizeBoundingBoxes floor
            raise CnnlabError(f"augment.min_box_size must be >= 1 pixel, got {self.min_box_size!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> JointAugment:
        """From a config dict (lists become tuples); an unknown key is an error that suggests the closest."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise CnnlabError(f"unknown augment option {key!r}{did_you_mean(key, names)} "
                                  f"(expected one of {', '.join(names)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _check_pair(value: Any, name: str, ordered: bool = False) -> None:
    if value is None:
        return
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok or (ordered and value[0] > value[1]):
        expected = "(min, max) with 0 < min <= max" if ordered else "(H, W) of positive integers"
        raise CnnlabError(f"augment.{name} must be {expected}, got {value!r}")


def per_box_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """``SanitizeBoundingBoxes``'s labels_getter: the target's per-box tensors, so dropping a box drops its
    label, iscrowd, area and difficult flag too (masks are dropped by torchvision itself). Module level, so a
    pipeline pickles into DataLoader workers under any start method."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    if not isinstance(target, Mapping):
        raise CnnlabError("detection transforms expect (image, target) with a target dict holding 'boxes'")
    return tuple(target[k] for k in PER_BOX_FIELDS if isinstance(target.get(k), torch.Tensor))


def _resize(cfg: JointAugment) -> list[T.Transform]:
    if cfg.resize is None:
        return []
    size = [cfg.resize] if isinstance(cfg.resize, int) else list(cfg.resize)
    return [T.Resize(size, max_size=cfg.max_size, antialias=True)]


def _scale(cfg: JointAugment, fill: Any) -> list[T.Transform]:
    if cfg.scale is None or tuple(cfg.scale) == (1.0, 1.0):
        return []
    # an affine map with scale only moves every box corner exactly; SanitizeBoundingBoxes drops what leaves
    return [T.RandomAffine(degrees=0.0, scale=tuple(float(v) for v in cfg.scale), fill=fill)]


_TO_FLOAT = T.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)  # masks, boxes unchanged


def detection_transforms(cfg: JointAugment | None = None, train: bool = True) -> T.Compose:
    """The pipeline for ``(image, target)`` detection items; ends in float images in [0, 1].

    In training, boxes that augmentation left thinner than ``min_box_size`` (or degenerate in the annotation:
    zero width or height) are clamped to the image and dropped with their labels, per-box fields and masks
    (``SanitizeBoundingBoxes``); an image may end with no boxes, which the models train on. Evaluation only
    resizes, so ground truth is never dropped.
    """
    cfg = cfg or JointAugment()
    steps: list[T.Transform] = []
    if train:
        if cfg.photometric:
            steps.append(T.RandomPhotometricDistort(p=cfg.photometric))
        if cfg.zoom_out:
            steps.append(T.RandomZoomOut(fill={tv_tensors.Image: cfg.fill, "others": 0},
                                         side_range=(1.0, float(cfg.zoom_out_max)), p=cfg.zoom_out))
        if cfg.iou_crop:
            steps.append(T.RandomIoUCrop())
        steps += _scale(cfg, {tv_tensors.Image: cfg.fill, "others": 0})
        if cfg.random_resize:
            steps.append(T.RandomResize(cfg.random_resize[0], cfg.random_resize[1] + 1, antialias=True))
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.vflip:
            steps.append(T.RandomVerticalFlip(p=cfg.vflip))
        if cfg.crop:
            steps.append(T.RandomCrop(list(cfg.crop), pad_if_needed=True,
                                      fill={tv_tensors.Image: cfg.fill, "others": 0}))
    steps += _resize(cfg)
    steps.append(_TO_FLOAT)
    if train:
        steps += [T.ClampBoundingBoxes(),
                  T.SanitizeBoundingBoxes(min_size=cfg.min_box_size, min_area=1.0, labels_getter=per_box_fields)]
    return T.Compose(steps)


def segmentation_transforms(cfg: JointAugment | None = None, train: bool = True,
                            ignore_index: int = 255) -> T.Compose:
    """The pipeline for ``(image, {"mask": Mask})`` items: masks move with the image (nearest-neighbour
    resizing), and padding from crops is ``ignore_index`` in the mask, so no loss or metric counts it."""
    cfg = cfg or JointAugment()
    if cfg.iou_crop:
        raise CnnlabError("augment.iou_crop crops around boxes and applies to detection only; "
                          "use augment.crop for segmentation")
    fill = {tv_tensors.Image: cfg.fill, tv_tensors.Mask: ignore_index}
    steps: list[T.Transform] = []
    if train:
        if cfg.photometric:
            steps.append(T.RandomPhotometricDistort(p=cfg.photometric))
        if cfg.zoom_out:
            steps.append(T.RandomZoomOut(fill=fill, side_range=(1.0, float(cfg.zoom_out_max)), p=cfg.zoom_out))
        steps += _scale(cfg, fill)
        if cfg.random_resize:
            steps.append(T.RandomResize(cfg.random_resize[0], cfg.random_resize[1] + 1, antialias=True))
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.vflip:
            steps.append(T.RandomVerticalFlip(p=cfg.vflip))
        if cfg.crop:
            steps.append(T.RandomCrop(list(cfg.crop), pad_if_needed=True, fill=fill))
    steps += _resize(cfg)
    steps.append(_TO_FLOAT)
    return T.Compose(steps)
