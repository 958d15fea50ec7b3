"""Annotation readers: COCO JSON and Pascal VOC XML -> one checked record per image (boxes XYXY, 0-based).

The readers only parse and check; the datasets in ``cnnlab.data.annotated`` read the pixels and build the
``tv_tensors`` targets. A plain ``json``/``xml.etree`` reader is enough here: pycocotools adds nothing to
reading a file (it matters for mAP and for rasterising masks, where ``CocoDetection(masks=True)`` uses it),
and an error from it would not name the annotation at fault.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError

# Pascal VOC's 20 classes in the devkit's order; label i + 1 (0 is background, as in torchvision).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# A box may pass the image border by this much (annotation tools round: COCO has x + w = 640.01 on 640-px
# images) and is then clipped; further out is an error, since the box then belongs to another image size.
BORDER_TOLERANCE = 1.0


@dataclass
class ImageRecord:
    """One image's annotations, checked: boxes XYXY in pixels (0-based, continuous), labels 1..K.

    ``segmentations`` holds COCO's raw polygons/RLE per box (empty when the format has none); ``extra``
    per-box fields such as ``iscrowd``, ``area`` (COCO) or ``difficult`` (VOC).
    """

    image_id: int | str
    path: Path
    height: int | None
    width: int | None
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)
    segmentations: list[Any] = field(default_factory=list)


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CnnlabError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def check_box(box: Sequence[float], height: int | None, width: int | None, where: str) -> list[float]:
    """XYXY box checked against its image: x2 >= x1, y2 >= y1, inside the image (within 1 px, then clipped).

    Zero-width or zero-height boxes pass: ``SanitizeBoundingBoxes`` drops them in the pipeline (documented).
    """
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise CnnlabError(f"{where}: box {list(box)} has x2 < x1 or y2 < y1 (expected x1 <= x2 and y1 <= y2)")
    if height is not None and width is not None:
        tol = BORDER_TOLERANCE
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise CnnlabError(f"{where}: box {list(box)} lies outside the {width}x{height} image "
                              f"(expected 0 <= x1 <= x2 <= {width} and 0 <= y1 <= y2 <= {height})")
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return [x1, y1, x2, y2]


@dataclass
class CocoAnnotations:
    """A parsed COCO file: records in the file's image order, and the label <-> category id maps.

    Labels are contiguous, 1..K in increasing category id (COCO's ids run 1..90 with gaps); ``category_ids[l - 1]``
    maps label ``l`` back to the file's id, as an evaluator writing COCO results needs.
    """

    records: list[ImageRecord]
    category_ids: list[int]
    category_names: list[str]


def read_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> CocoAnnotations:
    """Read a COCO detection JSON (``images``, ``annotations``, ``categories``); errors name the file and entry.

    bbox [x, y, w, h] becomes [x, y, x + w, y + h]; ``iscrowd`` and ``area`` are kept per box (``area``
    defaults to w * h); images without annotations are kept with empty targets (vision#1598).
    ``image_root`` defaults to the JSON's folder; ``file_name`` is relative to it.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnlabError(f"COCO annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CnnlabError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CnnlabError(f"{path}: '{key}' must be a list (a COCO detection file has 'images', "
                              "'annotations' and 'categories')")

    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise CnnlabError(f"{path}: categories[{i}] needs an integer 'id', got {cat!r}")
        if cat["id"] in cats:
            raise CnnlabError(f"{path}: category id {cat['id']} appears twice in 'categories'")
        cats[cat["id"]] = str(cat.get("name", cat["id"]))
    category_ids = sorted(cats)
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}

    records: dict[Any, ImageRecord] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise CnnlabError(f"{where} needs 'id' and 'file_name', got {img!r}")
        if img["id"] in records:
            raise CnnlabError(f"{where}: image id {img['id']!r} appears twice in 'images'")
        height, width = img.get("height"), img.get("width")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise CnnlabError(f"{where}: '{name}' must be a positive integer, got {v!r}")
        records[img["id"]] = ImageRecord(img["id"], root / img["file_name"], height, width,
                                         extra={"iscrowd": [], "area": []})

    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            raise CnnlabError(f"{where} must be an object, got {ann!r}")
        rec = records.get(ann.get("image_id"))
        if rec is None:
            raise CnnlabError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        cid = ann.get("category_id")
        if cid not in label_of:
            raise CnnlabError(f"{where}: unknown category_id {cid!r} (the file's categories are "
                              f"{category_ids[:20]}{' ...' if len(category_ids) > 20 else ''})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise CnnlabError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (_number(v, where, "each bbox value") for v in bbox)
        if w < 0 or h < 0:
            raise CnnlabError(f"{where}: bbox {list(bbox)} has a negative width or height (expected [x, y, w, h], "
                              "w >= 0 and h >= 0)")
        rec.boxes.append(check_box([x, y, x + w, y + h], rec.height, rec.width, where))
        rec.labels.append(label_of[cid])
        rec.extra["iscrowd"].append(int(bool(ann.get("iscrowd", 0))))
        area = ann.get("area")
        rec.extra["area"].append(w * h if area is None else _number(area, where, "'area'"))
        rec.segmentations.append(ann.get("segmentation"))
    return CocoAnnotations(list(records.values()), category_ids, [cats[c] for c in category_ids])


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise CnnlabError(f"{where}: missing <{tag}>")
    return child.text.strip()


def read_voc_xml(path: str | os.PathLike, image_dir: str | os.PathLike,
                 label_of: dict[str, int] | None, data: bytes | None = None) -> ImageRecord:
    """One VOC annotation XML -> a record; ``label_of`` maps class names to 1..K (None: names are not checked).
    ``data``: the XML's bytes when it is not a file (a member of an archive); ``path`` then only names it.

    VOC boxes are 1-based inclusive pixel indices; xmin=1, xmax=W covers the whole image, which is (0, W) in
    continuous coordinates, so x1 = xmin - 1 and x2 = xmax (as detectron2's pascal_voc reader does).
    ``difficult`` is kept per box (training uses them, VOC evaluation ignores them).
    """
    path = Path(path)
    try:
        tree = ET.fromstring(data) if data is not None else ET.parse(path).getroot()
    except FileNotFoundError:
        raise CnnlabError(f"VOC annotation {path} does not exist") from None
    except ET.ParseError as e:
        raise CnnlabError(f"VOC annotation {path} is not valid XML: {e}") from None
    where = str(path)
    filename = tree.findtext("filename")
    image_path = Path(image_dir) / (filename.strip() if filename and filename.strip() else path.stem + ".jpg")
    height = width = None
    size = tree.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        try:
            width, height = int(float(_xml_text(size, "width", where))), int(float(_xml_text(size, "height", where)))
        except ValueError:
            raise CnnlabError(f"{where}: <size> must hold integer <width> and <height>") from None
        if width <= 0 or height <= 0:  # some VOC exports write 0 x 0: the image itself then says
            width = height = None
    rec = ImageRecord(path.stem, image_path, height, width, extra={"difficult": []})
    for k, obj in enumerate(tree.findall("object")):
        owhere = f"{where}: object {k}"
        name = _xml_text(obj, "name", owhere)
        if label_of is not None and name not in label_of:
            raise CnnlabError(f"{owhere}: unknown class {name!r} (expected one of {sorted(label_of)})")
        box = obj.find("bndbox")
        if box is None:
            raise CnnlabError(f"{owhere} ({name}): missing <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(_xml_text(box, t, owhere)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise CnnlabError(f"{owhere} ({name}): <bndbox> values must be numbers") from None
        if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
            raise CnnlabError(f"{owhere} ({name}): <bndbox> values must be finite")
        rec.boxes.append(check_box([xmin - 1, ymin - 1, xmax, ymax], height, width, f"{owhere} ({name})"))
        rec.labels.append(label_of[name] if label_of is not None else 0)
        difficult = obj.findtext("difficult")
        rec.extra["difficult"].append(int(difficult.strip() == "1") if difficult else 0)
    return rec


def voc_class_names(xml_paths: Sequence[Path]) -> list[str]:
    """Sorted class names found in these VOC XMLs (for folders that are not the 20-class VOC)."""
    names: set[str] = set()
    for p in xml_paths:
        try:
            # objects' own <name> only: VOC's person layout nests <part><name>head</name></part>
            names.update(n.strip() for obj in ET.parse(p).getroot().findall("object")
                         if (n := obj.findtext("name")) and n.strip())
        except ET.ParseError as e:
            raise CnnlabError(f"VOC annotation {p} is not valid XML: {e}") from None
    return sorted(names)


def read_split(path: Path) -> list[str]:
    """An ``ImageSets/*/<split>.txt``: one image id per line (VOC's Main files may add a ' 1' / '-1' column)."""
    if not path.is_file():
        raise CnnlabError(f"split file {path} does not exist")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise CnnlabError(f"split file {path} lists no image ids")
    return ids


class DegenerateBoxWarning(UserWarning):
    """Zero-width or zero-height boxes were dropped from an annotation file."""


def drop_degenerate_boxes(records: Sequence[ImageRecord], source: str | os.PathLike) -> int:
    """Remove boxes with zero width or height (with their labels, per-box fields and segmentations), in place,
    warning once per ``source`` with the count and the first image; returns how many were dropped.

    Such a box can match no prediction (IoU 0 with anything), so kept in evaluation it would lower recall
    for every model alike; in training ``SanitizeBoundingBoxes`` would drop it anyway.
    """
    dropped, first = 0, None
    for rec in records:
        keep = [k for k, b in enumerate(rec.boxes) if b[2] > b[0] and b[3] > b[1]]
        if len(keep) == len(rec.boxes):
            continue
        n = len(rec.boxes)
        dropped += n - len(keep)
        first = rec if first is None else first
        rec.boxes = [rec.boxes[k] for k in keep]
        rec.labels = [rec.labels[k] for k in keep]
        rec.extra = {name: [v[k] for k in keep] if len(v) == n else v for name, v in rec.extra.items()}
        if len(rec.segmentations) == n:
            rec.segmentations = [rec.segmentations[k] for k in keep]
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} zero-area box(es) (x1 == x2 or y1 == y2), the first in image "
                      f"{first.image_id!r}; a box needs a positive width and height", DegenerateBoxWarning,
                      stacklevel=2)
    return dropped
