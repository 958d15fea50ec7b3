"""Detection and segmentation datasets: images of any size with per-image targets as ``tv_tensors``.

Each item is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8, C x H x W; the transforms of
``cnnlab.data.joint_transforms`` end in float32 in [0, 1]) and ``target`` a dict in torchvision's detection
convention (``boxes`` ``BoundingBoxes`` XYXY with the image's ``canvas_size``, ``labels`` int64 1..K with 0
the background, ``image_id``, optional ``masks``) or, for segmentation, ``{"mask": Mask (H, W), "image_id"}``
with ``ignore_index`` (VOC's 255) on pixels no loss or metric should see. They are plain map-style datasets:
a ``torch.utils.data.DataLoader`` with workers and a collate of ``cnnlab.data.collate`` batches them.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cnnlab._errors import CnnlabError
from cnnlab.data.annotations import (
    ImageRecord,
    check_box,
    read_coco,
    read_split,
    read_voc_xml,
    voc_class_names,
)
from cnnlab.data.folder import IMAGE_EXTENSIONS, read_image

Transforms = Callable[[Any, Any], tuple[Any, Any]]


def _check_files(paths: Sequence[Path], what: str, source: Path) -> None:
    """Fail at construction, not in a worker an hour into training, when files named by ``source`` are missing."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CnnlabError(f"{source} names {what} {missing[0]} that does not exist{more}")


def _read_rgb(path: Path, expected_hw: tuple[int | None, int | None], source: Path) -> tv_tensors.Image:
    image = read_image(path, 3, None)  # uint8 (3, H, W); a bad file is a CnnlabError naming it
    h, w = image.shape[-2:]
    eh, ew = expected_hw
    if (eh is not None and eh != h) or (ew is not None and ew != w):
        raise CnnlabError(f"image {path} is {w}x{h} but {source} says {ew}x{eh}; the boxes are for that size")
    return tv_tensors.Image(image)


def _detection_target(rec: ImageRecord, height: int, width: int) -> dict[str, Any]:
    boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
    target: dict[str, Any] = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(rec.labels, dtype=torch.int64),
        "image_id": rec.image_id,
    }
    for name, values in rec.extra.items():
        if name == "area":
            target[name] = torch.tensor(values, dtype=torch.float32)
        elif name == "difficult":
            target[name] = torch.tensor(values, dtype=torch.bool)
        else:
            target[name] = torch.tensor(values, dtype=torch.int64)
    return target


def _coco_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """One annotation's ``segmentation`` (polygons, RLE or compressed RLE) -> (H, W) uint8, by pycocotools:
    it is COCO's reference rasteriser (PIL's polygon fill, for one, also paints the right and bottom edges:
    99 pixels instead of COCO's 80 for a 10 x 8 box), so masks and their areas match the evaluator's."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise CnnlabError("CocoDetection(masks=True) needs pycocotools (pip install 'cnnlab[detection]')") from None
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size is not None and list(size) != [height, width]:
            raise CnnlabError(f"{where}: RLE size {list(size)} differs from the image's [height, width] "
                              f"[{height}, {width}]")
        if isinstance(segmentation.get("counts"), list) and sum(segmentation["counts"]) != height * width:
            raise CnnlabError(f"{where}: RLE counts sum to {sum(segmentation['counts'])}, expected "
                              f"{height * width} pixels")
        rles = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, list) and segmentation:
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                raise CnnlabError(f"{where}: a segmentation polygon must be [x1, y1, x2, y2, ...] with >= 3 "
                                  f"points, got {poly!r}")
        rles = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        raise CnnlabError(f"{where}: masks=True needs a 'segmentation' (polygons or RLE), got {segmentation!r}")
    with warnings.catch_warnings():  # pycocotools 2.0.x's numpy-2 copy= notice, not ours to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rles).astype(np.uint8)


class CocoDetection(Dataset):
    """A COCO-format detection set: ``annotation_file`` (JSON) and the images it names.

    Args:
        annotation_file: the JSON (``images``, ``annotations``, ``categories``).
        image_root: folder ``file_name`` is relative to (default: the JSON's folder).
        transforms: ``(image, target) -> (image, target)``, e.g. ``detection_transforms(...)``.
        masks: also return ``masks`` (``tv_tensors.Mask`` N x H x W, uint8) from the ``segmentation`` fields.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 transforms: Transforms | None = None, masks: bool = False) -> None:
        self.annotation_file = Path(annotation_file)
        parsed = read_coco(self.annotation_file, image_root)
        self.records = parsed.records
        self.category_ids, self.classes = parsed.category_ids, parsed.category_names
        self.num_classes = len(self.classes) + 1  # background counts, as torchvision's num_classes does
        self.transforms, self.masks = transforms, masks
        _check_files([r.path for r in self.records], "image", self.annotation_file)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        rec = self.records[i]
        image = _read_rgb(rec.path, (rec.height, rec.width), self.annotation_file)
        h, w = image.shape[-2:]
        target = _detection_target(rec, h, w)
        if self.masks:
            target["masks"] = tv_tensors.Mask(self._masks(rec, h, w))
        return self.transforms(image, target) if self.transforms is not None else (image, target)

    def _masks(self, rec: ImageRecord, h: int, w: int) -> torch.Tensor:
        out = np.zeros((len(rec.boxes), h, w), dtype=np.uint8)
        for k, seg in enumerate(rec.segmentations):
            where = f"{self.annotation_file}: image {rec.image_id!r}, annotation {k}"
            out[k] = _coco_mask(seg, h, w, where)
        return torch.from_numpy(out)


class VOCDetection(Dataset):
    """A Pascal VOC folder: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

    Args:
        root: the folder holding ``Annotations/`` and ``JPEGImages/`` (e.g. ``VOCdevkit/VOC2012``).
        split: the ``ImageSets/Main`` file to read (``train``, ``val``, ``trainval``, ``test``); None: every XML.
        classes: class names, label = index + 1 (``VOC_CLASSES`` for VOC itself); default the sorted names
            found in all of ``Annotations/``, so every split of one folder gets the same labels.
        transforms: ``(image, target) -> (image, target)``.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train", classes: Sequence[str] | None = None,
                 transforms: Transforms | None = None) -> None:
        self.root = Path(root)
        ann_dir, image_dir = self.root / "Annotations", self.root / "JPEGImages"
        if not ann_dir.is_dir():
            raise CnnlabError(f"VOC folder {self.root} has no Annotations/ (expected Annotations/*.xml, "
                              "JPEGImages/ and ImageSets/Main/<split>.txt)")
        if split is None:
            xmls = sorted(ann_dir.glob("*.xml"))
            if not xmls:
                raise CnnlabError(f"{ann_dir} holds no .xml annotations")
        else:
            xmls = [ann_dir / f"{i}.xml" for i in read_split(self.root / "ImageSets" / "Main" / f"{split}.txt")]
            _check_files(xmls, "annotation", self.root / "ImageSets" / "Main" / f"{split}.txt")
        if classes is None:
            classes = voc_class_names(sorted(ann_dir.glob("*.xml")))
        self.classes = list(classes)
        if len(set(self.classes)) != len(self.classes):
            raise CnnlabError(f"classes {self.classes} name a class twice")
        self.num_classes = len(self.classes) + 1
        label_of = {name: i + 1 for i, name in enumerate(self.classes)}
        self.records = [read_voc_xml(p, image_dir, label_of) for p in xmls]
        self.transforms = transforms
        for rec, xml in zip(self.records, xmls):
            _check_files([rec.path], "image", xml)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        rec = self.records[i]
        image = _read_rgb(rec.path, (rec.height, rec.width), self.root / "Annotations" / f"{rec.image_id}.xml")
        h, w = image.shape[-2:]
        if rec.height is None:  # the XML had no <size>: check the boxes against the image now
            where = f"{self.root / 'Annotations' / f'{rec.image_id}.xml'}"
            rec.boxes = [check_box(b, h, w, where) for b in rec.boxes]
        target = _detection_target(rec, h, w)
        return self.transforms(image, target) if self.transforms is not None else (image, target)


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def read_class_mask(path: Path) -> np.ndarray:
    """A mask PNG -> (H, W) uint8 class indices: palette ('P') PNGs give their indices, not their colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "1"):
                raise CnnlabError(f"mask {path} is a {img.mode} image; expected a palette (P) or greyscale (L) PNG "
                                  "whose pixel values are class indices")
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise CnnlabError(f"cannot read mask {path}: {e}") from None


class SegmentationFolder(Dataset):
    """Images and per-pixel class masks, VOC layout by default:
    ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, ``ImageSets/Segmentation/<split>.txt``.

    Args:
        root: the folder.
        split: the split file's name; None: every image in ``image_dir`` that has a mask of the same stem.
        num_classes: classes including background; mask values must be < it or ``ignore_index`` (None: unchecked).
        ignore_index: the value no loss or metric counts (VOC's object borders are 255).
        image_dir, mask_dir, split_dir: the sub-folders, for other layouts (``images/`` + ``masks/``).
        transforms: ``(image, target) -> (image, target)``, e.g. ``segmentation_transforms(...)``.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train", num_classes: int | None = None,
                 ignore_index: int = 255, transforms: Transforms | None = None, image_dir: str = "JPEGImages",
                 mask_dir: str = "SegmentationClass", split_dir: str = "ImageSets/Segmentation") -> None:
        self.root = Path(root)
        images, masks = self.root / image_dir, self.root / mask_dir
        for folder in (images, masks):
            if not folder.is_dir():
                raise CnnlabError(f"segmentation folder {self.root} has no {folder.name}/ (expected {image_dir}/ "
                                  f"with the images and {mask_dir}/ with PNG masks of class indices)")
        if split is not None:
            split_file = self.root / split_dir / f"{split}.txt"
            ids = read_split(split_file)
            pairs = []
            for i in ids:
                image = _find_image(images, i)
                if image is None:
                    raise CnnlabError(f"{split_file} names image {i!r} but {images} has no {i}.<jpg|png|...>")
                pairs.append((i, image, masks / f"{i}.png"))
            _check_files([m for _, _, m in pairs], "mask", split_file)
        else:
            found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            pairs = [(p.stem, p, masks / f"{p.stem}.png") for p in found if (masks / f"{p.stem}.png").is_file()]
            if not pairs:
                raise CnnlabError(f"no image in {images} has a mask <same name>.png in {masks}")
        if num_classes is not None and not 0 < num_classes <= 256:
            raise CnnlabError(f"num_classes must be in 1..256 for 8-bit masks, got {num_classes}")
        self.samples = pairs
        self.num_classes, self.ignore_index, self.transforms = num_classes, ignore_index, transforms

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image_id, image_path, mask_path = self.samples[i]
        image = tv_tensors.Image(read_image(image_path, 3, None))
        mask = read_class_mask(mask_path)
        if mask.shape != tuple(image.shape[-2:]):
            raise CnnlabError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                              f"{image.shape[-1]}x{image.shape[-2]}; a mask must have its image's size")
        if self.num_classes is not None:
            bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
            if bad.size:
                raise CnnlabError(f"mask {mask_path} holds values {bad[:10].tolist()}; expected class indices "
                                  f"0..{self.num_classes - 1} or {self.ignore_index} (ignored)")
        target = {"mask": tv_tensors.Mask(torch.from_numpy(mask)), "image_id": image_id}
        return self.transforms(image, target) if self.transforms is not None else (image, target)
