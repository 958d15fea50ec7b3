"""Detection mAP you can check: COCO (equal to pycocotools' COCOeval) and Pascal VOC (py-faster-rcnn's voc_eval).

``evaluate(predictions, targets, metric="coco")`` takes torchvision-style lists of per-image dicts (tensors or
numpy) and returns a ``DetectionMetrics``: a dict of the summary numbers, plus per-class AP and PR curves.
See docs/detection_metrics.md for which average is which and how they compare with pycocotools and torchmetrics.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.detection import _coco_eval, _voc_eval

METRICS = ("coco", "voc", "voc07")


class DetectionMetrics(dict):
    """The summary numbers (``dict`` of name -> float) with per-class results beside them.

    COCO keys: ``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl`` (COCOeval.summarize's order);
    VOC keys: ``mAP``. -1 marks a number that has nothing to measure (no gt), as pycocotools.

    Attributes:
        metric: "coco", "voc" or "voc07".
        classes: the class keys (names from ``class_names``, else the integer labels), in label order.
        per_class: class -> AP (COCO: AP@[.5:.95]; VOC: AP at the threshold), -1 for a class without gt.
        per_class_ap50: COCO only: class -> AP at IoU 0.5 (-1 without gt).
        num_gt: class -> number of gt boxes that count (COCO: not crowd; VOC: not difficult).
        details: COCO: ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) as COCOeval.eval, with
            ``iou_thresholds``, ``recall_thresholds``, ``area_ranges``, ``max_dets``; VOC: ``iou_threshold``.
    """

    def __init__(self, summary: Mapping[str, float], *, metric: str, classes: list, per_class: dict,
                 num_gt: dict, per_class_ap50: dict | None = None, details: dict | None = None,
                 curves: dict | None = None) -> None:
        super().__init__(summary)
        self.metric = metric
        self.classes = classes
        self.per_class = per_class
        self.per_class_ap50 = per_class_ap50
        self.num_gt = num_gt
        self.details = details or {}
        self._curves = curves or {}

    def as_dict(self, per_class: bool = False) -> dict[str, float]:
        """Plain floats: the summary, and with ``per_class`` one ``AP/<class>`` entry per class."""
        out = {k: float(v) for k, v in self.items()}
        if per_class:
            out.update({f"AP/{c}": float(v) for c, v in self.per_class.items()})
            if self.per_class_ap50 is not None:
                out.update({f"AP50/{c}": float(v) for c, v in self.per_class_ap50.items()})
        return out

    def pr_curves(self, iou: float = 0.5) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """class -> (recall, precision) arrays for the classes that have gt.

        COCO: the 101-point interpolated precision at ``iou`` (one of the evaluated thresholds), area all,
        100 detections, against recall 0, 0.01, ..., 1. VOC: the raw curve, one point per counted detection
        in score order (``iou`` must be the evaluated threshold).
        """
        if self.metric == "coco":
            thr = self.details["iou_thresholds"]
            t = np.flatnonzero(np.isclose(thr, iou, rtol=0.0, atol=1e-12))
            if t.size == 0:
                raise CnnlabError(f"no PR curve at IoU {iou}: evaluated thresholds are {thr.round(4).tolist()}")
            rec = self.details["recall_thresholds"]
            p = self.details["precision"][t[0], :, :, 0, -1]
            return {c: (rec.copy(), p[:, k].copy()) for k, c in enumerate(self.classes) if p[0, k] > -1}
        if not np.isclose(iou, self.details["iou_threshold"]):
            raise CnnlabError(f"no PR curve at IoU {iou}: this {self.metric} evaluation used IoU "
                              f"{self.details['iou_threshold']}; evaluate again with iou_thresholds={iou}")
        return {c: curve for c, curve in self._curves.items() if self.num_gt[c] > 0}

    def table(self) -> str:
        """A plain-text table of AP per class (and AP50 for COCO) with the gt counts."""
        name_width = max([5] + [len(str(c)) for c in self.classes])
        head = f"{'class':<{name_width}}  {'gt':>6}  {'AP':>7}" + ("  {:>7}".format("AP50") if self.per_class_ap50
                                                                    is not None else "")
        lines = [head]
        for c in self.classes:
            row = f"{str(c):<{name_width}}  {self.num_gt[c]:>6d}  {self.per_class[c]:>7.4f}"
            if self.per_class_ap50 is not None:
                row += f"  {self.per_class_ap50[c]:>7.4f}"
            lines.append(row)
        lines.append("  ".join(f"{k}={v:.4f}" for k, v in self.items()))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- input checks
def _array(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu()
        if value.is_floating_point():  # float16/bfloat16 have no numpy dtype; float64 holds them exactly
            value = value.double()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise CnnlabError(f"{where} is not an array ({type(value).__name__}): {err}") from None


def _boxes(value: Any, where: str) -> np.ndarray:
    boxes = _array(value, where)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise CnnlabError(f"{where} has shape {tuple(boxes.shape)}; expected (N, 4) boxes x1, y1, x2, y2")
    if not np.issubdtype(boxes.dtype, np.number) or np.issubdtype(boxes.dtype, np.complexfloating):
        raise CnnlabError(f"{where} has dtype {boxes.dtype}; expected real numbers")
    boxes = boxes.astype(np.float64)
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CnnlabError(f"{where}[{i}] = {boxes[i].tolist()} is not finite (NaN or inf); expected real "
                          "coordinates")
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        i = int(np.flatnonzero(flipped)[0])
        raise CnnlabError(f"{where}[{i}] = {boxes[i].tolist()} has x2 < x1 or y2 < y1; expected x1, y1, x2, y2 "
                          "with x2 >= x1 and y2 >= y1")
    return boxes


def _vector(value: Any, n: int, where: str, kind: str) -> np.ndarray:
    v = _array(value, where)
    v = v.reshape(-1) if v.size else np.zeros(0, v.dtype)
    if v.shape[0] != n:
        raise CnnlabError(f"{where} has {v.shape[0]} entries but the image has {n} boxes; expected one per box")
    exact = np.issubdtype(v.dtype, np.integer) or v.dtype == bool  # nothing to check for integral values
    if kind == "label":
        if v.size and not exact and (not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v))
                                     or not np.all(v == np.round(v))):
            raise CnnlabError(f"{where} holds non-integer values; expected int64 class labels")
        return v.astype(np.int64)
    if kind == "bool":
        if v.size and v.dtype != bool and not np.all((v == 0) | (v == 1)):
            raise CnnlabError(f"{where} holds values other than 0/1 (False/True)")
        return v.astype(bool)
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise CnnlabError(f"{where}[{i}] is {v[i]}; expected a finite number")
    if kind == "area" and np.any(v < 0):
        raise CnnlabError(f"{where}[{int(np.flatnonzero(v < 0)[0])}] is negative; expected areas >= 0")
    return v


def _field(d: Any, key: str, where: str, required: bool = True) -> Any:
    if not isinstance(d, Mapping):
        raise CnnlabError(f"{where} is a {type(d).__name__}; expected a dict with boxes, labels(, scores)")
    if key not in d:
        if required:
            raise CnnlabError(f"{where} has no '{key}' (keys: {sorted(map(str, d))})")
        return None
    return d[key]


def _flatten(predictions: Sequence[Mapping], targets: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Validated per-image dicts -> one flat float64/int64 array per field, with the image index of each row."""
    if not isinstance(predictions, Sequence) or not isinstance(targets, Sequence) or isinstance(
            predictions, (str, Mapping)) or isinstance(targets, (str, Mapping)):
        raise CnnlabError("predictions and targets must be lists of per-image dicts (image i of one is image i "
                          f"of the other); got {type(predictions).__name__} and {type(targets).__name__}")
    if len(predictions) != len(targets):
        raise CnnlabError(f"predictions has {len(predictions)} images but targets has {len(targets)}; expected "
                          "one dict per image in both, in the same order")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "gt_image", "gt_boxes", "gt_labels", "gt_crowd", "gt_area", "gt_difficult",
        "dt_image", "dt_boxes", "dt_scores", "dt_labels")}
    for i, (pred, tgt) in enumerate(zip(predictions, targets)):
        w = f"targets[{i}]"
        boxes = _boxes(_field(tgt, "boxes", w), f"{w}['boxes']")
        n = boxes.shape[0]
        cols["gt_boxes"].append(boxes)
        cols["gt_labels"].append(_vector(_field(tgt, "labels", w), n, f"{w}['labels']", "label"))
        crowd = _field(tgt, "iscrowd", w, required=False)
        cols["gt_crowd"].append(np.zeros(n, bool) if crowd is None else _vector(crowd, n, f"{w}['iscrowd']", "bool"))
        diff = _field(tgt, "difficult", w, required=False)
        cols["gt_difficult"].append(np.zeros(n, bool) if diff is None
                                    else _vector(diff, n, f"{w}['difficult']", "bool"))
        area = _field(tgt, "area", w, required=False)
        # Without an annotated area, COCO's area of a box: w * h with +0 widths (the xywh json's w and h).
        cols["gt_area"].append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) if area is None
                               else _vector(area, n, f"{w}['area']", "area"))
        cols["gt_image"].append(np.full(n, i, np.int64))
        w = f"predictions[{i}]"
        boxes = _boxes(_field(pred, "boxes", w), f"{w}['boxes']")
        n = boxes.shape[0]
        cols["dt_boxes"].append(boxes)
        cols["dt_scores"].append(_vector(_field(pred, "scores", w), n, f"{w}['scores']", "score"))
        cols["dt_labels"].append(_vector(_field(pred, "labels", w), n, f"{w}['labels']", "label"))
        cols["dt_image"].append(np.full(n, i, np.int64))
    out = {}
    for k, parts in cols.items():
        if parts:
            out[k] = np.concatenate(parts)
        else:
            out[k] = np.zeros((0, 4) if k.endswith("boxes") else 0)
    for k in ("gt_image", "gt_labels", "dt_image", "dt_labels"):
        out[k] = out[k].astype(np.int64)
    for k in ("gt_crowd", "gt_difficult"):
        out[k] = out[k].astype(bool)
    return out


def _classes(flat: dict[str, np.ndarray], class_names: Sequence[str] | None) -> tuple[np.ndarray, list]:
    """The evaluated labels and their keys: 1..K with names when class_names is given, else every label seen."""
    if class_names is None:
        labels = np.unique(np.concatenate([flat["gt_labels"], flat["dt_labels"]]))
        return labels, [int(c) for c in labels]
    names = list(class_names)
    labels = np.arange(1, len(names) + 1)
    for side, key in (("targets", "gt_labels"), ("predictions", "dt_labels")):
        bad = (flat[key] < 1) | (flat[key] > len(names))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            image = int(flat[key.replace("labels", "image")][j])
            raise CnnlabError(f"{side}[{image}]['labels'] holds {int(flat[key][j])}; with {len(names)} class_names "
                              f"labels must be 1..{len(names)} (0 is background)")
    return labels, names


def evaluate(predictions: Sequence[Mapping], targets: Sequence[Mapping], metric: str = "coco", *,
             iou_thresholds: float | Sequence[float] | None = None, class_names: Sequence[str] | None = None,
             plus_one: bool = False) -> DetectionMetrics:
    """Mean average precision of detections against ground truth.

    Args:
        predictions: one dict per image: ``boxes`` (N, 4) x1, y1, x2, y2, ``scores`` (N,), ``labels`` (N,).
        targets: one dict per image, the same images in the same order: ``boxes``, ``labels``, optional
            ``iscrowd`` (COCO crowd regions), ``area`` (COCO area ranges; else the box's w * h),
            ``difficult`` (VOC).
        metric: "coco" (COCOeval bbox, its twelve numbers), "voc" (all-point AP, VOC2010+) or "voc07" (11-point).
        iou_thresholds: COCO: the thresholds (default 0.50:0.05:0.95 as pycocotools, in float64); VOC: one
            threshold (default 0.5).
        class_names: names of labels 1..K; every one of them is evaluated (a class without gt gets -1).
            Without it the classes are the labels that occur.
        plus_one: VOC only: inclusive pixel widths (x2 - x1 + 1) as py-faster-rcnn, for boxes in VOC's
            integer pixel indices.
    """
    if metric not in METRICS:
        raise CnnlabError(f"unknown detection metric {metric!r}; expected one of {', '.join(METRICS)}"
                          + did_you_mean(str(metric), METRICS))
    flat = _flatten(predictions, targets)
    labels, keys = _classes(flat, class_names)
    gt_class = np.searchsorted(labels, flat["gt_labels"])
    dt_class = np.searchsorted(labels, flat["dt_labels"])
    if metric == "coco":
        return _evaluate_coco(flat, len(predictions), labels, keys, gt_class, dt_class, iou_thresholds, plus_one)
    return _evaluate_voc(flat, metric, keys, gt_class, dt_class, iou_thresholds, plus_one)


def _evaluate_coco(flat: dict[str, np.ndarray], num_images: int, labels: np.ndarray, keys: list,
                   gt_class: np.ndarray, dt_class: np.ndarray, iou_thresholds: Any, plus_one: bool
                   ) -> DetectionMetrics:
    if plus_one:
        raise CnnlabError("plus_one is a VOC convention; COCO boxes have +0 widths (pycocotools' x2 - x1)")
    if iou_thresholds is None:
        thresholds = _coco_eval.COCO_IOU_THRESHOLDS
    else:
        thresholds = np.atleast_1d(np.asarray(iou_thresholds, np.float64))
        if thresholds.ndim != 1 or thresholds.size == 0 or np.any((thresholds < 0) | (thresholds > 1)):
            raise CnnlabError(f"iou_thresholds={iou_thresholds!r}; expected IoU values in [0, 1]")
    arrays = _coco_eval.coco_evaluate(
        num_images=num_images, num_classes=len(labels), gt_image=flat["gt_image"], gt_class=gt_class,
        gt_boxes=flat["gt_boxes"], gt_area=flat["gt_area"], gt_crowd=flat["gt_crowd"],
        dt_image=flat["dt_image"], dt_class=dt_class, dt_boxes=flat["dt_boxes"], dt_scores=flat["dt_scores"],
        iou_thresholds=thresholds)
    ap = _coco_eval.coco_per_class(arrays)
    ap50 = _coco_eval.coco_per_class(arrays, 0.5)
    counted = np.bincount(gt_class[~flat["gt_crowd"]], minlength=len(labels))
    details = {"precision": arrays.precision, "recall": arrays.recall, "iou_thresholds": thresholds,
               "recall_thresholds": _coco_eval.RECALL_THRESHOLDS, "area_ranges": dict(zip(
                   _coco_eval.AREA_LABELS, _coco_eval.AREA_RANGES)), "max_dets": _coco_eval.MAX_DETS}
    return DetectionMetrics(
        _coco_eval.coco_summary(arrays), metric="coco", classes=keys,
        per_class={c: float(v) for c, v in zip(keys, ap)},
        per_class_ap50={c: float(v) for c, v in zip(keys, ap50)},
        num_gt={c: int(n) for c, n in zip(keys, counted)}, details=details)


def _evaluate_voc(flat: dict[str, np.ndarray], metric: str, keys: list, gt_class: np.ndarray,
                  dt_class: np.ndarray, iou_thresholds: Any, plus_one: bool) -> DetectionMetrics:
    thr = 0.5 if iou_thresholds is None else np.asarray(iou_thresholds, np.float64).reshape(-1)
    if not isinstance(thr, float):
        if thr.size != 1 or not 0 < thr[0] <= 1:
            raise CnnlabError(f"iou_thresholds={iou_thresholds!r}; VOC takes one IoU threshold in (0, 1]")
        thr = float(thr[0])
    results = _voc_eval.voc_evaluate(
        num_classes=len(keys), gt_image=flat["gt_image"], gt_class=gt_class, gt_boxes=flat["gt_boxes"],
        gt_difficult=flat["gt_difficult"], dt_image=flat["dt_image"], dt_class=dt_class,
        dt_boxes=flat["dt_boxes"], dt_scores=flat["dt_scores"], iou_threshold=thr,
        use_07_metric=metric == "voc07", plus_one=plus_one)
    aps = np.array([r.ap for r in results])
    valid = aps[aps > -1]
    return DetectionMetrics(
        {"mAP": float(valid.mean()) if valid.size else -1.0}, metric=metric, classes=keys,
        per_class={c: r.ap for c, r in zip(keys, results)}, num_gt={c: r.num_gt for c, r in zip(keys, results)},
        details={"iou_threshold": thr, "plus_one": plus_one},
        curves={c: (r.recall, r.precision) for c, r in zip(keys, results)})
