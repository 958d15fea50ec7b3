"""``fashion_seg``: the ``fashion_det`` canvases with a class per pixel (semantic segmentation).

The canvases are exactly those ``--data fashion_det`` trains on (the same :class:`FashionDetConfig`, so the same
cache file ``<cache>/fashion_det/fashion_det-<key>.npz`` serves both; nothing is composed differently). Each
pixel's label is the class of the item painted there: 0 for the background, Fashion-MNIST class ``c`` at label
``c + 1`` (11 classes, ``FASHION_SEG_CLASSES``). Where two items overlap, the one pasted later is on top, both
in the pixels (the composer paints later items over earlier ones) and in the mask, so a label always names the
item whose pixels are visible there; the boxes of ``fashion_det`` stay amodal (each item's whole extent).
A pixel is foreground exactly where its grey value is above 0 (every item pixel is above the mask threshold).

Splits: train (8,000), val (1,000) and test (2,000) canvases of 128 x 128 grey pixels, as fashion_det's.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from cnnlab.data.datasets import FASHION_CLASSES
from cnnlab.data.detection_data import FASHION_DET_CONFIG
from cnnlab.data.fashion_det import SPLITS, Composed, FashionDetConfig, load_fashion_det

FASHION_SEG_CLASSES = ["background", *FASHION_CLASSES]
# the canvases of --data fashion_seg: fashion_det's own, so one cache file serves both
FASHION_SEG_CONFIG = FASHION_DET_CONFIG


def semantic_masks(composed: Composed) -> np.ndarray:
    """(N, S, S) uint8 labels of a split: per pixel the label of the topmost item, 0 where there is none.

    Items are painted in their stored order (painting order within a canvas), so a later item overwrites an
    earlier one where its mask is on; equal to ``composed.semantic_mask(i)`` for every canvas, in one pass over
    the items instead of a full-canvas mask per item.
    """
    n, size = len(composed), composed.images.shape[-1]
    out = np.zeros((n, size, size), dtype=np.uint8)
    canvas_of = np.repeat(np.arange(n), np.diff(composed.offsets))
    boxes = composed.boxes.astype(np.int64)
    for m, (x1, y1, x2, y2) in enumerate(boxes):
        crop = composed.masks[composed.mask_offsets[m]:composed.mask_offsets[m + 1]]
        region = out[canvas_of[m], y1:y2, x1:x2]
        region[crop.reshape(y2 - y1, x2 - x1).astype(bool)] = composed.labels[m]
    return out


def load_fashion_seg(config: FashionDetConfig | None = None, root: str | os.PathLike | None = None,
                     download: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (images uint8 (N, 1, S, S), masks uint8 (N, S, S))}`` for train, val and test.

    Args:
        config: the composition (default ``FASHION_SEG_CONFIG``, fashion_det's).
        root: fashion_det's cache folder (default ``<cache>/fashion_det``); download: whether Fashion-MNIST
            may be downloaded when the canvases are not cached yet.
    """
    splits = load_fashion_det(config or FASHION_SEG_CONFIG, root=root, download=download)
    return {s: (torch.from_numpy(splits[s].images)[:, None], torch.from_numpy(semantic_masks(splits[s])))
            for s in SPLITS}


def class_pixel_fractions(masks: torch.Tensor, num_classes: int) -> list[float]:
    """Share of the pixels of ``masks`` (any shape, integer labels) in each class 0..K-1 (255 not counted)."""
    flat = masks.reshape(-1).long()
    counts = torch.bincount(flat[flat != 255], minlength=num_classes)[:num_classes].double()
    return (counts / counts.sum().clamp(min=1)).tolist()
