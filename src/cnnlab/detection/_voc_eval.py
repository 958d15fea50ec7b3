"""Pascal VOC average precision (py-faster-rcnn's ``voc_eval`` semantics), vectorised.

Per class: all images' detections by score; each takes the gt of its image and class with the largest IoU
(whether or not that gt is already taken, as the VOC devkit); IoU >= threshold and the gt free -> TP and the gt
is taken, gt already taken -> FP, gt difficult -> neither, IoU below -> FP. AP is the area under the monotone
precision envelope (all-point, VOC2010+) or the mean of 11 precisions at recall 0, 0.1, ..., 1 (VOC2007).
Inputs are flat numpy arrays prepared by ``cnnlab.detection.metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bound on the (detection, gt) pairs whose IoU is held at once.
_PAIR_CHUNK = 1 << 22
# py-faster-rcnn's 11 recall points, np.arange(0., 1.1, 0.1): 0.3 is 0.30000000000000004 (also 0.6, 0.7), so a
# recall of exactly 3/10 does not reach it. Kept for equality with the published VOC07 numbers.
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


@dataclass
class VocClassResult:
    """One class: AP (-1 without non-difficult gt), gt count, and the raw PR curve (detections matched to a
    difficult gt are left out of it; they move neither recall nor precision)."""

    ap: float
    num_gt: int
    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray


def box_iou_voc(dt: np.ndarray, gt: np.ndarray, plus_one: bool) -> np.ndarray:
    """Row-wise IoU of (P, 4) and (P, 4) xyxy boxes; ``plus_one`` counts pixels inclusively (width x2-x1+1),
    the VOC devkit's and py-faster-rcnn's convention for VOC's integer pixel indices."""
    one = 1.0 if plus_one else 0.0
    iw = np.maximum(np.minimum(dt[:, 2], gt[:, 2]) - np.maximum(dt[:, 0], gt[:, 0]) + one, 0.0)
    ih = np.maximum(np.minimum(dt[:, 3], gt[:, 3]) - np.maximum(dt[:, 1], gt[:, 1]) + one, 0.0)
    inter = iw * ih
    union = ((dt[:, 2] - dt[:, 0] + one) * (dt[:, 3] - dt[:, 1] + one)
             + (gt[:, 2] - gt[:, 0] + one) * (gt[:, 3] - gt[:, 1] + one) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _best_gt(dt_boxes: np.ndarray, gt_boxes: np.ndarray, gt_start: np.ndarray, gt_count: np.ndarray,
             plus_one: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, the largest IoU over its candidate gts gt_start..gt_start+gt_count-1 and the first
    gt reaching it (np.argmax's tie rule, as py-faster-rcnn); -inf and -1 where there is no candidate."""
    n = dt_boxes.shape[0]
    best_iou = np.full(n, -np.inf)
    best_gt = np.full(n, -1, np.int64)
    has = np.flatnonzero(gt_count > 0)
    pos = 0
    while pos < has.size:
        # A chunk of detections whose pairs fit the budget.
        pairs = np.cumsum(gt_count[has[pos:]])
        take = max(1, int(np.searchsorted(pairs, _PAIR_CHUNK, side="right")))
        det = has[pos:pos + take]
        pos += det.size
        counts = gt_count[det]
        offsets = np.cumsum(counts) - counts
        det_rep = np.repeat(det, counts)
        gt_rep = np.repeat(gt_start[det], counts) + np.arange(counts.sum()) - np.repeat(offsets, counts)
        iou = box_iou_voc(dt_boxes[det_rep], gt_boxes[gt_rep], plus_one)
        seg_max = np.maximum.reduceat(iou, offsets)
        is_max = iou == np.repeat(seg_max, counts)
        hit = np.flatnonzero(is_max)
        seg_of_hit = np.repeat(np.arange(det.size), counts)[hit]
        _, first = np.unique(seg_of_hit, return_index=True)  # first maximum of each detection's segment
        best_iou[det] = seg_max
        best_gt[det] = gt_rep[hit[first]]
    return best_iou, best_gt


def _voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_POINTS:
            reached = recall >= t
            ap += (float(np.max(precision[reached])) if reached.any() else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_evaluate(*, num_classes: int, gt_image: np.ndarray, gt_class: np.ndarray, gt_boxes: np.ndarray,
                 gt_difficult: np.ndarray, dt_image: np.ndarray, dt_class: np.ndarray, dt_boxes: np.ndarray,
                 dt_scores: np.ndarray, iou_threshold: float = 0.5, use_07_metric: bool = False,
                 plus_one: bool = False) -> list[VocClassResult]:
    """AP per class index 0..num_classes-1.

    Args:
        gt_*, dt_*: one row per box (image index, class index, float64 xyxy box; difficult flag; score).
        iou_threshold: a detection is a hit when its best IoU is >= this (the devkit's rule).
        use_07_metric: VOC2007's 11-point AP instead of the all-point area.
        plus_one: inclusive pixel widths (x2 - x1 + 1), as py-faster-rcnn on VOC's pixel indices.
    """
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    dt_boxes = np.asarray(dt_boxes, np.float64).reshape(-1, 4)
    n_images = int(max(gt_image.max(initial=-1), dt_image.max(initial=-1))) + 1
    # gts sorted by (class, image): each detection's candidates are one contiguous run.
    g_key = gt_class.astype(np.int64) * n_images + gt_image
    g_order = np.lexsort((np.arange(g_key.size), g_key))
    g_key_sorted = g_key[g_order]
    d_key = dt_class.astype(np.int64) * n_images + dt_image
    lo = np.searchsorted(g_key_sorted, d_key, side="left")
    hi = np.searchsorted(g_key_sorted, d_key, side="right")
    best_iou, best = _best_gt(dt_boxes, gt_boxes[g_order], lo, hi - lo, plus_one)
    best_gt = np.full(best.shape, -1, np.int64)
    best_gt[best >= 0] = g_order[best[best >= 0]]  # back to the caller's gt indices
    difficult = gt_difficult.astype(bool)
    difficult_or_none = np.r_[difficult, False]  # index -1 (no gt) reads False
    n_pos = np.bincount(gt_class[~difficult], minlength=num_classes)

    # Score order per class; ties keep image order, then the order within the image (a stable sort).
    order = np.lexsort((np.arange(d_key.size), -dt_scores, dt_class))
    classes = dt_class[order]
    results = []
    for k in range(num_classes):
        idx = order[classes == k]
        hit = best_iou[idx] >= iou_threshold
        gt_of = best_gt[idx]
        on_difficult = hit & difficult_or_none[gt_of]
        counted = ~on_difficult
        idx, hit, gt_of = idx[counted], hit[counted], gt_of[counted]
        # The first (highest-scored) hit on a gt is the TP; later hits on it are duplicates, so FP.
        tp = np.zeros(idx.size, bool)
        hit_pos = np.flatnonzero(hit)
        _, first = np.unique(gt_of[hit_pos], return_index=True)
        tp[hit_pos[first]] = True
        tp_cum = np.cumsum(tp).astype(np.float64)
        fp_cum = np.cumsum(~tp).astype(np.float64)
        npos = int(n_pos[k])
        if npos == 0:
            results.append(VocClassResult(-1.0, 0, np.zeros(0), np.zeros(0), dt_scores[idx]))
            continue
        recall = tp_cum / npos
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        results.append(VocClassResult(_voc_ap(recall, precision, use_07_metric), npos, recall, precision,
                                      dt_scores[idx]))
    return results
