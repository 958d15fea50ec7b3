"""COCO box evaluation with pycocotools' ``COCOeval`` semantics, vectorised over images, classes and thresholds.

The numbers equal ``COCOeval(iouType="bbox")`` bit for bit where the arithmetic allows (same float64 IoU
formula, same thresholds, same stable orderings); see docs/detection_metrics.md. Inputs are flat numpy arrays
prepared (and validated) by ``cnnlab.detection.metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pycocotools' Params.setDetParams, rebuilt with the same calls so the float64 values are identical
# (0.55 is the double nearest 0.55, 0.9 is 0.8999999999999999, as there).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0.0, 1e10), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e10))
AREA_LABELS = ("all", "small", "medium", "large")

# Bound on the elements of one chunk's (groups, areas, thresholds, gts) arrays: keeps the working set in cache.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class CocoArrays:
    """What ``COCOeval.accumulate`` leaves in ``eval``: precision (T, R, K, A, M), recall (T, K, A, M), -1 where
    a class has no ground truth in that area range."""

    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray


def xywh(boxes: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 -> x, y, w, h in float64 with +0 widths, as COCO's json stores boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _box_iou_xywh(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of (..., D, 4) and (..., G, 4) xywh boxes -> (..., D, G), the same float64 operations, in the same
    order, as pycocotools' C ``bbIou``; against a crowd region it is intersection over the detection's area."""
    dx, dy, dw, dh = (dt[..., :, None, i] for i in range(4))
    gx, gy, gw, gh = (gt[..., None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    d_area, g_area = dw * dh, gw * gh
    union = np.where(crowd[..., None, :], d_area, d_area + g_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _last_argmax(x: np.ndarray) -> np.ndarray:
    # pycocotools moves its match whenever a later gt's IoU is >= the best so far: ties go to the last gt.
    return x.shape[-1] - 1 - np.argmax(x[..., ::-1], axis=-1)


def greedy_match(ious: np.ndarray, num_dets: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray,
                 gt_valid: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's matching for B (image, class) groups at once, every area range and threshold.

    Args:
        ious: (B, D, G) detection-gt IoU, detections in score order (padding is never read or never matches).
        num_dets: (B,) real detections per group, sorted descending so the groups still matching at rank r
            are a prefix.
        gt_ignore: (B, A, G) gt ignored in area range A (crowd, or area outside the range).
        gt_crowd: (B, G) crowd regions: they absorb any number of detections.
        gt_valid: (B, G) False for padding.
        thresholds: (T,) IoU thresholds.

    Returns (matched, matched_ignored), both (B, A, T, D) bool: a detection matched some gt; the gt was ignored.
    """
    n_groups, n_dets, n_gts = ious.shape
    n_areas, n_thr = gt_ignore.shape[1], len(thresholds)
    thr = np.minimum(thresholds, 1 - 1e-10)[None, None, :, None]  # pycocotools caps the bar below 1
    available = np.repeat(np.repeat(gt_valid[:, None, None, :], n_areas, 1), n_thr, 2)
    regular = ~gt_ignore[:, :, None, :]
    any_ignored = bool(gt_ignore[gt_valid[:, None, :].repeat(n_areas, 1)].any())
    matched = np.zeros((n_groups, n_areas, n_thr, n_dets), bool)
    matched_ignored = np.zeros_like(matched)
    active = (num_dets[None, :] > np.arange(n_dets)[:, None]).sum(1)
    for r in range(n_dets):
        n = int(active[r])
        iou = ious[:n, r, None, None, :]  # (n, 1, 1, G)
        ok = available[:n] & (iou >= thr)  # (n, A, T, G)
        # A detection takes the best free regular gt; only if there is none, the best ignored one.
        on_regular = ok & regular[:n]
        has_regular = on_regular.any(-1)
        best = _last_argmax(np.where(on_regular, iou, -np.inf))
        if any_ignored:
            on_ignored = ok & ~regular[:n]
            has_ignored = on_ignored.any(-1) & ~has_regular
            best = np.where(has_regular, best, _last_argmax(np.where(on_ignored, iou, -np.inf)))
            hit = has_regular | has_ignored
            matched_ignored[:n, :, :, r] = has_ignored
        else:
            hit = has_regular
        matched[:n, :, :, r] = hit
        b, a, t = np.nonzero(hit)
        g = best[b, a, t]
        used = ~gt_crowd[b, g]  # a crowd region stays available
        available[b[used], a[used], t[used], g[used]] = False
    return matched, matched_ignored


def _group_starts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted keys -> (unique keys, start of each run, length of each run)."""
    if keys.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, keys.size])
    return keys[starts], starts, counts


def _match_all(dt_box: np.ndarray, dt_start: np.ndarray, dt_count: np.ndarray, gt_box: np.ndarray,
               gt_start: np.ndarray, gt_count: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray,
               thresholds: np.ndarray, n_det_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs greedy_match over the groups that have both detections and gts, in chunks of similar gt counts."""
    n_areas, n_thr = gt_ignore.shape[0], len(thresholds)
    matched = np.zeros((n_areas, n_thr, n_det_total), bool)
    matched_ignored = np.zeros_like(matched)
    if dt_start.size == 0:
        return matched, matched_ignored
    g_pad = 1 << np.ceil(np.log2(gt_count)).astype(np.int64)  # bucket by gt count rounded up to a power of 2
    order = np.lexsort((-dt_count, g_pad))
    pos = 0
    while pos < order.size:
        width = int(g_pad[order[pos]])
        same = order[pos:][g_pad[order[pos:]] == width]
        # (B, A, T, G) per rank and (B, A, T, D) for the results: bound both (the first group has most dets).
        size = max(1, _CHUNK_ELEMENTS // (n_areas * n_thr * (width + int(dt_count[same[0]]))))
        chunk = same[:size]
        pos += chunk.size
        d_len = int(dt_count[chunk].max())
        d_idx = dt_start[chunk, None] + np.arange(d_len)[None, :]
        d_real = np.arange(d_len)[None, :] < dt_count[chunk, None]
        g_idx = gt_start[chunk, None] + np.arange(width)[None, :]
        g_real = np.arange(width)[None, :] < gt_count[chunk, None]
        d_idx = np.where(d_real, d_idx, 0)
        g_idx = np.where(g_real, g_idx, 0)
        crowd = gt_crowd[g_idx] & g_real
        ious = _box_iou_xywh(dt_box[d_idx], gt_box[g_idx], crowd)
        ignore = np.moveaxis(gt_ignore[:, g_idx], 0, 1)  # (B, A, G)
        m, mi = greedy_match(ious, dt_count[chunk], ignore, crowd, g_real, thresholds)
        flat = d_idx[d_real]  # (B, D) -> the real detections, row-major like m[..., d_real]
        matched[:, :, flat] = np.moveaxis(m, 0, 2)[:, :, d_real]
        matched_ignored[:, :, flat] = np.moveaxis(mi, 0, 2)[:, :, d_real]
    return matched, matched_ignored


def _interpolate(tp: np.ndarray, fp: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, n) cumulative TP/FP counts -> (rows, R) precision at the recall thresholds and (rows,) recall,
    as COCOeval.accumulate: precision made monotone from the right, read at the first point reaching each
    recall threshold, 0 past the last point."""
    n_rows, n = tp.shape
    if n == 0:
        return np.zeros((n_rows, len(RECALL_THRESHOLDS))), np.zeros(n_rows)
    tp_f, fp_f = tp.astype(np.float64), fp.astype(np.float64)
    recall = tp_f[:, -1] / n_pos
    precision = tp_f / (fp_f + tp_f + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # searchsorted(tp / n_pos, thresholds) for every row at once: the first j with j / n_pos >= threshold
    # (the same float division), then the first point whose integer TP count reaches j.
    need = np.searchsorted(np.arange(n_pos + 1) / n_pos, RECALL_THRESHOLDS, side="left")
    stride = n_pos + 2
    rows = np.arange(n_rows)[:, None]
    idx = np.searchsorted((tp + rows * stride).ravel(), (need[None, :] + rows * stride).ravel(), side="left")
    idx = idx.reshape(n_rows, -1) - rows * n
    inside = idx < n
    values = np.take_along_axis(envelope, np.minimum(idx, n - 1), axis=1)
    return np.where(inside, values, 0.0), recall


def coco_evaluate(*, num_images: int, num_classes: int, gt_image: np.ndarray, gt_class: np.ndarray,
                  gt_boxes: np.ndarray, gt_area: np.ndarray, gt_crowd: np.ndarray, dt_image: np.ndarray,
                  dt_class: np.ndarray, dt_boxes: np.ndarray, dt_scores: np.ndarray,
                  iou_thresholds: np.ndarray = COCO_IOU_THRESHOLDS) -> CocoArrays:
    """COCOeval (bbox) evaluate + accumulate.

    Args:
        num_images, num_classes: images are 0..num_images-1, classes 0..num_classes-1 (indices, not labels).
        gt_*: one row per gt box: image index, class index, xyxy box, area (from the annotation or the box),
            crowd flag.
        dt_*: one row per detection: image index, class index, xyxy box, score.
        iou_thresholds: float64 thresholds (T,).
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    n_thr, n_rec, n_areas, n_max = len(thresholds), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, num_classes, n_areas, n_max))
    recall = -np.ones((n_thr, num_classes, n_areas, n_max))
    lo = np.array([a[0] for a in AREA_RANGES])[:, None]
    hi = np.array([a[1] for a in AREA_RANGES])[:, None]

    # Ground truth grouped by (image, class), keeping the annotation order (pycocotools' stable sort).
    g_key = gt_image.astype(np.int64) * num_classes + gt_class
    g_order = np.lexsort((np.arange(g_key.size), g_key))
    g_box = xywh(gt_boxes)[g_order]
    g_crowd = gt_crowd[g_order].astype(bool)
    g_area = gt_area[g_order].astype(np.float64)
    g_ignore = g_crowd[None, :] | (g_area[None, :] < lo) | (g_area[None, :] > hi)  # (A, G)
    g_class = gt_class[g_order]
    n_pos = np.zeros((num_classes, n_areas), np.int64)
    for a in range(n_areas):
        n_pos[:, a] = np.bincount(g_class[~g_ignore[a]], minlength=num_classes)

    # Detections grouped by (image, class), by score (stable), then cut to the largest maxDets per group.
    d_key = dt_image.astype(np.int64) * num_classes + dt_class
    d_order = np.lexsort((np.arange(d_key.size), -dt_scores, d_key))
    d_key = d_key[d_order]
    keys, starts, counts = _group_starts(d_key)
    rank = np.arange(d_key.size) - np.repeat(starts, counts)
    keep = rank < MAX_DETS[-1]
    d_order, d_key, rank = d_order[keep], d_key[keep], rank[keep]
    keys, starts, counts = _group_starts(d_key)
    d_box = xywh(dt_boxes)[d_order]
    d_area = d_box[:, 2] * d_box[:, 3]  # loadRes: area of a result box is w * h

    g_keys, g_starts, g_counts = _group_starts(g_key[g_order])
    both, d_pos, g_pos = np.intersect1d(keys, g_keys, assume_unique=True, return_indices=True)
    matched, matched_ignored = _match_all(d_box, starts[d_pos], counts[d_pos], g_box, g_starts[g_pos],
                                          g_counts[g_pos], g_ignore, g_crowd, thresholds, d_key.size)
    # An unmatched detection outside the area range is ignored too.
    d_out = (d_area[None, :] < lo) | (d_area[None, :] > hi)  # (A, D)
    ignored = matched_ignored | (~matched & d_out[:, None, :])

    # accumulate: per class, all images' detections by score; ties keep image order, then per-image order.
    d_class = dt_class[d_order]
    d_image = dt_image[d_order]
    acc = np.lexsort((d_order, d_image, -dt_scores[d_order], d_class))
    classes, c_starts, c_counts = _group_starts(d_class[acc])
    seg = {int(c): (int(s), int(n)) for c, s, n in zip(classes, c_starts, c_counts)}
    counted = ~ignored[:, :, acc]  # (A, T, D) in accumulation order: each class is one contiguous run
    is_tp = matched[:, :, acc] & counted
    is_fp = ~matched[:, :, acc] & counted
    rank = rank[acc]
    for k in range(num_classes):
        s, n = seg.get(k, (0, 0))
        for a in range(n_areas):
            if n_pos[k, a] == 0:
                continue  # -1: no gt of this class in this range
            tp_a, fp_a = is_tp[a, :, s:s + n], is_fp[a, :, s:s + n]  # (T, n)
            for m, max_det in enumerate(MAX_DETS):
                # Detections past maxDet stay in as zero rows: they repeat the previous point of the curve
                # and change neither the envelope nor the recall at which each threshold is first reached.
                within = rank[s:s + n] < max_det
                tp = np.cumsum(tp_a & within, axis=1)
                fp = np.cumsum(fp_a & within, axis=1)
                q, rc = _interpolate(tp, fp, int(n_pos[k, a]))
                precision[:, :, k, a, m] = q
                recall[:, k, a, m] = rc
    return CocoArrays(precision=precision, recall=recall, iou_thresholds=thresholds)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _threshold_index(thresholds: np.ndarray, iou: float) -> np.ndarray:
    return np.flatnonzero(np.isclose(thresholds, iou, rtol=0.0, atol=1e-12))


def coco_summary(arrays: CocoArrays) -> dict[str, float]:
    """The twelve numbers of COCOeval.summarize(), in its order; -1 where nothing could be measured."""
    p, r, thr = arrays.precision, arrays.recall, arrays.iou_thresholds
    t50, t75 = _threshold_index(thr, 0.5), _threshold_index(thr, 0.75)
    big = len(MAX_DETS) - 1
    return {
        "AP": _mean_valid(p[:, :, :, 0, big]),
        "AP50": _mean_valid(p[t50][:, :, :, 0, big]),
        "AP75": _mean_valid(p[t75][:, :, :, 0, big]),
        "APs": _mean_valid(p[:, :, :, 1, big]),
        "APm": _mean_valid(p[:, :, :, 2, big]),
        "APl": _mean_valid(p[:, :, :, 3, big]),
        "AR1": _mean_valid(r[:, :, 0, 0]),
        "AR10": _mean_valid(r[:, :, 0, 1]),
        "AR100": _mean_valid(r[:, :, 0, big]),
        "ARs": _mean_valid(r[:, :, 1, big]),
        "ARm": _mean_valid(r[:, :, 2, big]),
        "ARl": _mean_valid(r[:, :, 3, big]),
    }


def coco_per_class(arrays: CocoArrays, iou: float | None = None) -> np.ndarray:
    """(K,) AP per class over all thresholds (iou=None) or at one threshold, area all, 100 detections."""
    p = arrays.precision[:, :, :, 0, len(MAX_DETS) - 1]
    if iou is not None:
        p = p[_threshold_index(arrays.iou_thresholds, iou)]
    return np.array([_mean_valid(p[:, :, k]) for k in range(p.shape[2])])
