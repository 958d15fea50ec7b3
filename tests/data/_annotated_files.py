"""Tiny detection/segmentation folders written by the tests: PNGs of different sizes, a COCO JSON, a VOC
folder (XML + ImageSets), a VOC segmentation folder with palette masks. Every value is written here, so the
tests' expected boxes and masks are hand-checkable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# (file, width, height): different sizes on purpose, one non-square each way
IMAGES = [("a.png", 40, 20), ("b.png", 24, 32), ("c.png", 30, 30)]

# COCO annotations: bbox [x, y, w, h]; c.png has none (vision#1598); category ids sparse (3 and 7).
# The RLE is column-major runs from zero: x 20..25, y 4..9 on the 20 x 40 image a.png (column x starts at
# x * 20, so 404 zeros, then 6 ones and 14 zeros per column, then 800 - 510 = 290 zeros).
COCO_ANNOTATIONS = [
    {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 2, 10, 8], "iscrowd": 0, "area": 70.0,
     "segmentation": [[5, 2, 15, 2, 15, 10, 5, 10]]},
    {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 4, 6, 6], "iscrowd": 1,
     "segmentation": {"size": [20, 40], "counts": [404, 6, 14, 6, 14, 6, 14, 6, 14, 6, 14, 6, 290]}},
    {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 24, 32], "iscrowd": 0,
     "segmentation": [[0, 0, 24, 0, 24, 32, 0, 32]]},
]


def image_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic RGB pattern whose columns differ, so a flip is visible."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_images(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (name, w, h) in enumerate(IMAGES):
        pixels = image_pixels(w, h, k)
        Image.fromarray(pixels).save(folder / name)
        out[name] = pixels
    return out


def write_coco(root: Path, annotations: list | None = None, **changes) -> Path:
    """root/images/*.png + root/annotations.json; ``changes`` replace top-level keys (for the fault tests)."""
    write_images(root / "images")
    data = {
        "images": [{"id": 10 + k, "file_name": f"images/{name}", "width": w, "height": h}
                   for k, (name, w, h) in enumerate(IMAGES)],
        "annotations": COCO_ANNOTATIONS if annotations is None else annotations,
        "categories": [{"id": 7, "name": "shirt"}, {"id": 3, "name": "bag"}],
    }
    data.update(changes)
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>"
        f"<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>"
        f"</object>" for name, b, difficult in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


# VOC objects: 1-based inclusive pixel boxes (xmin, ymin, xmax, ymax)
VOC_OBJECTS = {
    "a": [("dog", (6, 3, 15, 10), 0), ("cat", (1, 1, 40, 20), 1)],
    "b": [("cat", (2, 2, 10, 30), 0)],
    "c": [],
}


def write_voc(root: Path, objects: dict | None = None) -> Path:
    """root/JPEGImages/*.png, root/Annotations/*.xml, root/ImageSets/Main/{train,val}.txt."""
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for name, w, h in IMAGES:
        stem = name[:-4]
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(name, w, h, (objects or VOC_OBJECTS)[stem]))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\n")
    return root


def class_mask(width: int, height: int) -> np.ndarray:
    """Class 1 in the left quarter, class 2 in a block, 255 (VOC's border) on row 0."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 4] = 1
    mask[height // 2:, width // 2:] = 2
    mask[0, :] = 255
    return mask


def write_vocseg(root: Path) -> Path:
    """root/JPEGImages/*.png, root/SegmentationClass/*.png (palette), root/ImageSets/Segmentation/train.txt."""
    write_images(root / "JPEGImages")
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # VOC-like colours
    for name, w, h in IMAGES:
        m = Image.fromarray(class_mask(w, h), mode="P")
        m.putpalette(palette)
        m.save(root / "SegmentationClass" / f"{name[:-4]}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\n")
    return root
