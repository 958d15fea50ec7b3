"""Anchor shapes fitted to the training boxes: k-means with the 1 - IoU distance (Redmon & Farhadi 2017, §2).

YOLOv2 and YOLOv3 choose their anchors ("dimension clusters") by k-means on the widths and heights of the
training boxes, with the distance ``d(box, centroid) = 1 - IoU(box, centroid)`` between boxes placed at a
common centre, so that large boxes do not dominate as they would with a Euclidean distance on (w, h).

- :func:`wh_iou`: the IoU of (w, h) shapes aligned at a common centre, every pair.
- :func:`fit_anchors`: k (w, h) anchors by k-means (k-means++ seeding, several restarts, seeded), sorted by area.
- :func:`mean_best_iou`, :func:`anchor_recall`: how well a set of anchors covers the boxes (YOLOv2's "Avg IoU").
- :func:`check_anchors`: a :class:`~cnnlab._errors.CnnlabError` naming the setting and showing the boxes'
  size statistics when the anchors cannot work for the data (no or too few boxes matched).

All sizes are in the model's input pixels. scikit-learn's ``KMeans`` is not used: it has only the Euclidean
distance, and its centroids would then minimise squared (w, h) errors rather than maximise IoU.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cnnlab._errors import CnnlabError

__all__ = ["wh_iou", "fit_anchors", "mean_best_iou", "anchor_recall", "box_size_stats", "check_anchors"]


def _as_wh(box_wh: Tensor | list, what: str) -> Tensor:
    wh = torch.as_tensor(box_wh, dtype=torch.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise CnnlabError(f"{what} must be an (N, 2) tensor of (width, height) in pixels, got shape {tuple(wh.shape)}")
    if wh.numel() and (not torch.isfinite(wh).all() or (wh <= 0).any()):
        raise CnnlabError(f"{what} must hold positive finite widths and heights; got min {wh.min().item():g}")
    return wh


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of every pair of shapes ``wh1`` (N, 2) x ``wh2`` (K, 2) placed at a common centre: (N, K).

    ``min(w1, w2) * min(h1, h2) / (w1 h1 + w2 h2 - min(w1, w2) * min(h1, h2))``.
    """
    inter = torch.min(wh1[:, None, 0], wh2[None, :, 0]) * torch.min(wh1[:, None, 1], wh2[None, :, 1])
    area1, area2 = wh1[:, 0] * wh1[:, 1], wh2[:, 0] * wh2[:, 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def _kmeans_pp(wh: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with the 1 - IoU distance."""
    first = int(torch.randint(len(wh), (1,), generator=generator))
    centres = [wh[first]]
    for _ in range(1, k):
        d = 1.0 - wh_iou(wh, torch.stack(centres)).max(dim=1).values  # distance to the nearest centre
        weights = d.clamp(min=0) ** 2
        if float(weights.sum()) <= 0:  # every box already sits on a centre: any box will do
            weights = torch.ones_like(weights)
        centres.append(wh[int(torch.multinomial(weights, 1, generator=generator))])
    return torch.stack(centres)


def _lloyd(wh: Tensor, centres: Tensor, max_iter: int) -> Tensor:
    """Lloyd's iterations: each box to its nearest centre (highest IoU), each centre to the mean of its boxes."""
    for _ in range(max_iter):
        nearest = wh_iou(wh, centres).argmax(dim=1)
        new = centres.clone()
        for j in range(len(centres)):
            members = wh[nearest == j]
            if len(members):  # an empty cluster keeps its centre
                new[j] = members.mean(dim=0)
        if torch.allclose(new, centres, rtol=0, atol=1e-9):
            break
        centres = new
    return centres


def fit_anchors(box_wh: Tensor, k: int = 9, *, seed: int = 0, n_init: int = 3, max_iter: int = 300) -> Tensor:
    """k anchor shapes (w, h) for the boxes ``box_wh`` (N, 2), by k-means with the 1 - IoU distance.

    Args:
        box_wh: widths and heights of the training boxes, in the model's input pixels.
        k: the number of anchors (YOLOv3: 9, three per scale).
        seed: the k-means++ seeding's seed; the same boxes and seed give the same anchors.
        n_init: restarts; the one with the highest mean best IoU is kept.
        max_iter: Lloyd iterations per restart.
    Returns:
        (k, 2) float32 anchors, sorted by area (smallest first: YOLOv3 gives the first three to stride 8).
    """
    wh = _as_wh(box_wh, "box_wh")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CnnlabError(f"k (the number of anchors) must be a positive int, got {k!r}")
    if len(wh) == 0:
        raise CnnlabError("fit_anchors needs training boxes, got none (box_wh has 0 rows); give the anchors as a "
                          "list of (w, h) pairs instead of 'kmeans'")
    distinct = len(torch.unique(wh, dim=0))
    if distinct < k:
        raise CnnlabError(f"fit_anchors: k={k} anchors need at least {k} distinct box shapes, the data has "
                          f"{distinct} ({box_size_stats(wh)}); give fewer anchors or a list of (w, h) pairs")
    generator = torch.Generator().manual_seed(int(seed))
    best, best_score = None, -math.inf
    for _ in range(max(1, int(n_init))):
        centres = _lloyd(wh, _kmeans_pp(wh, k, generator), max_iter)
        score = float(wh_iou(wh, centres).max(dim=1).values.mean())
        if score > best_score + 1e-12:
            best, best_score = centres, score
    assert best is not None
    order = torch.argsort(best[:, 0] * best[:, 1], stable=True)
    return best[order].float()


def mean_best_iou(anchor_wh: Tensor, box_wh: Tensor) -> float:
    """The mean over boxes of the IoU with their best anchor (YOLOv2's "Avg IoU", Table 1); NaN without boxes."""
    wh, anchors = _as_wh(box_wh, "box_wh"), _as_wh(anchor_wh, "anchor_wh")
    if len(wh) == 0:
        return math.nan
    return float(wh_iou(wh, anchors).max(dim=1).values.mean())


def anchor_recall(anchor_wh: Tensor, box_wh: Tensor, threshold: float = 0.5) -> float:
    """The fraction of boxes whose best anchor (centre-aligned) has IoU >= ``threshold``; NaN without boxes."""
    wh, anchors = _as_wh(box_wh, "box_wh"), _as_wh(anchor_wh, "anchor_wh")
    if len(wh) == 0:
        return math.nan
    return float((wh_iou(wh, anchors).max(dim=1).values >= threshold).double().mean())


def box_size_stats(box_wh: Tensor) -> str:
    """``"N boxes, width min/median/max a/b/c px, height ..."``: the data's box sizes, for messages."""
    wh = _as_wh(box_wh, "box_wh")
    if len(wh) == 0:
        return "0 boxes"
    w, h = wh[:, 0], wh[:, 1]
    return (f"{len(wh)} boxes, width min/median/max {w.min():.1f}/{w.median():.1f}/{w.max():.1f} px, "
            f"height min/median/max {h.min():.1f}/{h.median():.1f}/{h.max():.1f} px")


def check_anchors(anchor_wh: Tensor, box_wh: Tensor, *, setting: str, threshold: float = 0.25,
                  min_recall: float = 0.5, hint: str = "use anchors='kmeans' to fit them to the data") -> dict[str, float]:
    """Refuse anchors that cannot work for the data; otherwise return their statistics.

    A box is matched when its best anchor (centre-aligned) has IoU >= ``threshold``. The anchors are refused
    (a CnnlabError whose message names ``setting`` and shows the boxes' sizes and the best IoU reached) when
    fewer than ``min_recall`` of the boxes are matched, in particular when none is (anchors in the wrong unit,
    such as fractions of the image instead of pixels).

    Args:
        anchor_wh: (K, 2) anchors (w, h) in the model's input pixels.
        box_wh: (N, 2) training boxes' widths and heights in the same pixels.
        setting: the option the anchors came from, for the message (``"model.options.anchors"``).
        threshold, min_recall: the IoU a match needs and the fraction of boxes that must match.
    Returns:
        ``{"boxes": N, "mean_best_iou": ..., "best_iou": ..., "recall": ...}`` (NaNs without boxes: nothing to check).
    """
    anchors = _as_wh(anchor_wh, f"{setting} (the anchors)")
    wh = _as_wh(box_wh, "box_wh")
    if len(anchors) == 0:
        raise CnnlabError(f"{setting} holds no anchors; expected (w, h) pairs in input pixels")
    if len(wh) == 0:
        return {"boxes": 0, "mean_best_iou": math.nan, "best_iou": math.nan, "recall": math.nan}
    best = wh_iou(wh, anchors).max(dim=1).values
    stats = {"boxes": len(wh), "mean_best_iou": float(best.mean()), "best_iou": float(best.max()),
             "recall": float((best >= threshold).double().mean())}
    if stats["recall"] < min_recall:
        shown = ", ".join(f"({w:g}, {h:g})" for w, h in anchors.tolist())
        matched = "no training box" if stats["recall"] == 0 else f"only {stats['recall']:.0%} of the training boxes"
        raise CnnlabError(
            f"{setting}: the anchors [{shown}] match {matched} at IoU >= {threshold:g} (at least {min_recall:.0%} "
            f"must); the data: {box_size_stats(wh)}; best IoU reached {stats['best_iou']:.3g}, mean best IoU "
            f"{stats['mean_best_iou']:.3g}. Anchors are (w, h) in the model's input pixels; {hint}")
    return stats


# -- the anchor check of detectors with fixed anchors (Faster R-CNN, RetinaNet, SSD) ---------------------------
def transform_box_wh(transform: Any, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(M, 4) boxes of an image of ``image_size`` (h, w) -> (M, 2) their (w, h) after ``transform``'s resize
    (a :class:`cnnlab.detection.transform.DetectionTransform`: a fixed size, or the eval short side within
    ``max_size``)."""
    height, width = image_size
    wh = (boxes[:, 2:] - boxes[:, :2]).float()
    if transform.fixed_size is not None:
        fw, fh = transform.fixed_size
        return wh * wh.new_tensor([fw / width, fh / height])
    scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
    return wh * scale


class AnchorCheck:
    """Mixin of detectors with fixed anchors: the task calls ``fit_to_data`` with the training boxes (in the
    model's input pixels, from ``input_box_wh``) and anchors that match (almost) none of them are refused, naming
    the setting and showing the boxes' sizes. Nothing is fitted: these anchors are the user's settings.

    A subclass gives ``anchor_shapes()`` ((K, 2) anchor widths and heights in input pixels), ``transform``
    (its resize) and ``anchor_setting`` (the option names, for the message)."""

    anchor_setting = "model.options.anchor_sizes / aspect_ratios"
    anchor_min_recall = 0.01  # refuse only anchors that cannot work: fewer than 1% of the boxes reach IoU 0.25

    def anchor_shapes(self) -> Tensor:
        raise NotImplementedError

    def input_box_wh(self, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        return transform_box_wh(self.transform, boxes, image_size)

    def fit_to_data(self, box_wh: Tensor, *, seed: int = 0) -> dict[str, Any]:
        box_wh = torch.as_tensor(box_wh, dtype=torch.float32).reshape(-1, 2).cpu()
        box_wh = box_wh[(box_wh > 0).all(dim=1)]
        stats = check_anchors(self.anchor_shapes(), box_wh, setting=self.anchor_setting,
                              min_recall=self.anchor_min_recall, hint="make them the size of the objects in pixels "
                              "of the resized input")
        return {"anchors": self.anchor_shapes().tolist(), **stats}


def generator_shapes(generator: Any) -> Tensor:
    """(K, 2) distinct (w, h) of an :class:`~cnnlab.detection.anchors.AnchorGenerator`'s cell anchors."""
    cells = torch.cat([c.float() for c in generator.cell_anchors])
    return torch.unique(torch.stack([cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]], 1), dim=0)
