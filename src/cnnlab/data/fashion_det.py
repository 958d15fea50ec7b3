"""``fashion_det``: a detection set composed from the real Fashion-MNIST images, with exact boxes and masks.

Each canvas (128 x 128 by default) holds 0..``max_items`` Fashion-MNIST items, each resized from 28 x 28 to a
side drawn in ``[min_scale, max_scale]`` (bilinear with antialiasing), placed so that the tight boxes of any
two items on a canvas overlap by IoU <= ``max_iou``. An item's pixels are those whose resized value is above
``mask_threshold`` (of 255); the rest of its square is cleared, so its box -- the tight box of those pixels,
``(c1, r1, c2 + 1, r2 + 1)`` for columns c1..c2 and rows r1..r2 -- is exact on the canvas. Items are painted
in order (a later one covers an earlier one where its mask is on); the instance masks are each item's whole
mask (amodal), the semantic mask the label of the topmost item per pixel (0: background). Labels are the
Fashion-MNIST class + 1 (1..10; ``FASHION_CLASSES``).

Splits: train and val canvases draw items from Fashion-MNIST's train split, without replacement (no source
image appears twice, so val shares none with train); test canvases from its test split. The set is made once
per config and cached (``<cache>/fashion_det/fashion_det-<key>.npz``, written atomically); the same config
gives byte-identical canvases.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError
from cnnlab.data.datasets import FASHION_CLASSES, default_cache_dir

# Bump when the composition changes, so caches written by an older rule are not reused.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FashionDetConfig:
    """How the canvases are composed (every field is part of the cache key).

    Args:
        canvas: canvas side in pixels (square).
        train, val, test: number of canvases per split (train + val items come from Fashion-MNIST's train split).
        min_items, max_items: items per non-empty canvas, drawn uniformly.
        empty_fraction: share of canvases with no item (detectors must learn images without boxes).
        min_scale, max_scale: an item's side after resizing from 28 px, drawn uniformly (inclusive).
        max_iou: largest IoU allowed between two items' boxes on one canvas.
        mask_threshold: a resized pixel above this value (0..255) belongs to the item.
        seed: the composition's seed (not the run's: the data stays the same across runs).
    """

    canvas: int = 128
    train: int = 8000
    val: int = 1000
    test: int = 2000
    min_items: int = 1
    max_items: int = 4
    empty_fraction: float = 0.03
    min_scale: int = 20
    max_scale: int = 64
    max_iou: float = 0.3
    mask_threshold: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("canvas", "train", "val", "test", "min_items", "max_items", "min_scale", "max_scale",
                "mask_threshold", "seed")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CnnlabError(f"FashionDetConfig.{name} must be a non-negative integer, got {v!r}")
        if not 1 <= self.min_items <= self.max_items:
            raise CnnlabError(f"FashionDetConfig needs 1 <= min_items <= max_items, got {self.min_items}, "
                              f"{self.max_items}")
        if not 1 <= self.min_scale <= self.max_scale <= self.canvas:
            raise CnnlabError(f"FashionDetConfig needs 1 <= min_scale <= max_scale <= canvas, got {self.min_scale}, "
                              f"{self.max_scale}, {self.canvas}")
        if not 0.0 <= self.empty_fraction < 1.0:
            raise CnnlabError(f"FashionDetConfig.empty_fraction must be in [0, 1), got {self.empty_fraction}")
        if not 0.0 <= self.max_iou <= 1.0:
            raise CnnlabError(f"FashionDetConfig.max_iou must be in [0, 1], got {self.max_iou}")
        if self.mask_threshold > 254:
            raise CnnlabError(f"FashionDetConfig.mask_threshold must be below 255, got {self.mask_threshold}")

    def key(self) -> str:
        text = json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Composed:
    """Canvases of one split: ``images`` uint8 (N, S, S) grey; per item ``boxes`` float32 (M, 4) XYXY,
    ``labels`` int64 (M,) 1..10, ``source`` (M,) index into the Fashion-MNIST split; ``offsets`` (N + 1,)
    so canvas i's items are ``offsets[i]:offsets[i + 1]`` in painting order; ``masks`` each item's mask
    cropped to its box, flattened and concatenated (``mask_offsets`` (M + 1,))."""

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    offsets: np.ndarray
    masks: np.ndarray
    mask_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def items(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def instance_masks(self, i: int) -> np.ndarray:
        """(k, S, S) uint8 0/1: canvas ``i``'s item masks (whole items, also where a later item covers them)."""
        sl, size = self.items(i), self.images.shape[-1]
        out = np.zeros((sl.stop - sl.start, size, size), dtype=np.uint8)
        for k, m in enumerate(range(sl.start, sl.stop)):
            x1, y1, x2, y2 = self.boxes[m].astype(int)
            crop = self.masks[self.mask_offsets[m]:self.mask_offsets[m + 1]]
            out[k, y1:y2, x1:x2] = crop.reshape(y2 - y1, x2 - x1)
        return out

    def semantic_mask(self, i: int) -> np.ndarray:
        """(S, S) uint8: the label of the topmost item at each pixel, 0 where there is none."""
        out = np.zeros(self.images.shape[-2:], dtype=np.uint8)
        sl = self.items(i)
        for m, mask in zip(range(sl.start, sl.stop), self.instance_masks(i)):
            out[mask.astype(bool)] = self.labels[m]
        return out


def _resize_items(sources: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """28 x 28 uint8 items -> each at its own side, batched per distinct side (a few dozen interpolations)."""
    out: list[np.ndarray] = [None] * len(sources)  # type: ignore[list-item]
    for s in np.unique(sizes):
        idx = np.nonzero(sizes == s)[0]
        x = torch.from_numpy(sources[idx]).float()[:, None]
        y = F.interpolate(x, size=(int(s), int(s)), mode="bilinear", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)[:, 0].numpy()
        for j, k in enumerate(idx):
            out[k] = y[j]
    return out


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(box: tuple[float, ...], others: list[tuple[float, ...]]) -> float:
    best = 0.0
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        union = (box[2] - box[0]) * (box[3] - box[1]) + (o[2] - o[0]) * (o[3] - o[1]) - inter
        best = max(best, inter / union)
    return best


def compose(items: np.ndarray, classes: np.ndarray, n: int, config: FashionDetConfig,
            rng: np.random.Generator, tries: int = 50) -> Composed:
    """Compose ``n`` canvases from grey ``items`` (K, h, w) uint8 with class indices ``classes`` (K,).

    Items are drawn without replacement while there are enough (then with); an item that cannot be placed
    within ``tries`` positions at the IoU bound, or whose resized pixels are all below the threshold, is left
    out, so a canvas may hold fewer than drawn. Labels are ``classes + 1``.
    """
    if items.ndim != 3 or len(items) != len(classes) or len(items) == 0:
        raise CnnlabError(f"compose needs items (K, h, w) and K classes, got {items.shape} and {classes.shape}")
    size = config.canvas
    counts = rng.integers(config.min_items, config.max_items + 1, size=n)
    counts[rng.random(n) < config.empty_fraction] = 0
    total = int(counts.sum())
    picks = rng.permutation(len(items))[:total] if total <= len(items) else rng.integers(0, len(items), total)
    sides = rng.integers(config.min_scale, config.max_scale + 1, size=total)
    # positions drawn up front (tries per item), so the draws do not depend on how placement went
    positions = rng.random((total, tries, 2))
    scaled = _resize_items(items[picks], sides)

    images = np.zeros((n, size, size), dtype=np.uint8)
    boxes, labels, source, offsets, masks, mask_offsets = [], [], [], [0], [], [0]
    m = 0
    for i in range(n):
        placed: list[tuple[float, ...]] = []
        for _ in range(int(counts[i])):
            item, s = scaled[m], int(sides[m])
            mask = item > config.mask_threshold
            tb = _tight_box(mask)
            if tb is not None:
                span = size - s
                for px, py in positions[m]:
                    x, y = int(px * (span + 1)), int(py * (span + 1))
                    box = (x + tb[0], y + tb[1], x + tb[2], y + tb[3])
                    if _iou(box, placed) <= config.max_iou:
                        region = images[i, y:y + s, x:x + s]
                        region[mask] = item[mask]
                        placed.append(box)
                        boxes.append(box)
                        labels.append(int(classes[picks[m]]) + 1)
                        source.append(int(picks[m]))
                        crop = mask[tb[1]:tb[3], tb[0]:tb[2]]
                        masks.append(crop.reshape(-1).astype(np.uint8))
                        mask_offsets.append(mask_offsets[-1] + crop.size)
                        break
            m += 1
        offsets.append(len(boxes))
    return Composed(
        images=images,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        source=np.asarray(source, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64),
        masks=np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8),
        mask_offsets=np.asarray(mask_offsets, dtype=np.int64),
    )


def generate(config: FashionDetConfig, train_images: np.ndarray, train_labels: np.ndarray,
             test_images: np.ndarray, test_labels: np.ndarray) -> dict[str, Composed]:
    """The three splits from Fashion-MNIST arrays (images (N, 28, 28) uint8, labels (N,)): train and val
    from one composition of the train split (the last ``val`` canvases are val), test from the test split."""
    rng = np.random.default_rng([config.seed, 0])
    pool = compose(train_images, train_labels, config.train + config.val, config, rng)
    test = compose(test_images, test_labels, config.test, config, np.random.default_rng([config.seed, 1]))
    return {"train": _subset(pool, 0, config.train), "val": _subset(pool, config.train, config.train + config.val),
            "test": test}


def _subset(c: Composed, start: int, stop: int) -> Composed:
    a, b = int(c.offsets[start]), int(c.offsets[stop])
    return Composed(c.images[start:stop], c.boxes[a:b], c.labels[a:b], c.source[a:b],
                    c.offsets[start:stop + 1] - a, c.masks[c.mask_offsets[a]:c.mask_offsets[b]],
                    c.mask_offsets[a:b + 1] - c.mask_offsets[a])


FIELDS = [f.name for f in dataclasses.fields(Composed)]


def _save(path: Path, splits: dict[str, Composed], config: FashionDetConfig) -> None:
    """Atomic: written to a temporary file in the same folder, then renamed, so a cache file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{split}/{name}": getattr(c, name) for split, c in splits.items() for name in FIELDS}
    arrays["config"] = np.frombuffer(json.dumps(dataclasses.asdict(config)).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fashion_det-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> dict[str, Composed]:
    try:
        with np.load(path) as z:
            return {s: Composed(**{n: z[f"{s}/{n}"] for n in FIELDS}) for s in SPLITS}
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise CnnlabError(f"fashion_det cache {path} is unreadable ({type(e).__name__}: {e}); delete it to "
                          "compose the set again") from None


def cache_path(config: FashionDetConfig, root: str | os.PathLike | None = None) -> Path:
    base = Path(root) if root is not None else default_cache_dir() / "fashion_det"
    return base / f"fashion_det-{config.key()}.npz"


def load_fashion_det(config: FashionDetConfig | None = None, root: str | os.PathLike | None = None,
                     fashion_root: str | os.PathLike | None = None, download: bool = True,
                     verbose: bool = False) -> dict[str, Composed]:
    """The three splits, from the cache or composed now (a few seconds) from Fashion-MNIST and cached.

    Args:
        config: the composition (default ``FashionDetConfig()``).
        root: the cache folder (default ``<cache>/fashion_det``).
        fashion_root, download: where Fashion-MNIST is and whether it may be downloaded (``fashion_mnist()``).
    """
    from cnnlab.data.datasets import fashion_mnist

    config = config or FashionDetConfig()
    path = cache_path(config, root)
    if path.is_file():
        return _load(path)
    t0 = time.perf_counter()
    fm = fashion_mnist(fashion_root, download)
    splits = generate(config, fm.train_images[:, 0].numpy(), fm.train_labels.numpy(),
                      fm.test_images[:, 0].numpy(), fm.test_labels.numpy())
    _save(path, splits, config)
    if verbose:
        print(f"fashion_det: composed {sum(len(c) for c in splits.values())} canvases in "
              f"{time.perf_counter() - t0:.1f} s -> {path}")
    return splits


class FashionDet(torch.utils.data.Dataset):
    """One split as a map-style dataset of ``(tv_tensors.Image uint8 (3, S, S), target)`` items.

    Args:
        composed: a split from :func:`load_fashion_det`.
        masks: add ``masks`` (k, S, S) uint8 to the target (the semantic mask: ``composed.semantic_mask(i)``).
        transforms: ``(image, target) -> (image, target)``.
    """

    classes = list(FASHION_CLASSES)

    def __init__(self, composed: Composed, masks: bool = False, transforms: Any = None) -> None:
        self.composed, self.masks, self.transforms = composed, masks, transforms

    def __len__(self) -> int:
        return len(self.composed)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        c = self.composed
        grey = torch.from_numpy(c.images[i])
        image = tv_tensors.Image(grey.expand(3, *grey.shape).clone())
        sl = c.items(i)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(c.boxes[sl].copy()), format="XYXY",
                                              canvas_size=tuple(grey.shape)),
            "labels": torch.from_numpy(c.labels[sl].copy()),
            "image_id": i,
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(c.instance_masks(i)))
        return self.transforms(image, target) if self.transforms is not None else (image, target)
