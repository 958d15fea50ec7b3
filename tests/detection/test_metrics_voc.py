"""cnnlab.detection.metrics, VOC (all-point) and VOC07 (11-point): hand computations and a loop reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.detection.metrics import evaluate

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _det(boxes, scores, labels=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return {"boxes": boxes, "scores": np.asarray(scores, np.float64),
            "labels": np.ones(len(boxes), np.int64) if labels is None else np.asarray(labels)}


def _gt(boxes, labels=None, difficult=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = {"boxes": boxes, "labels": np.ones(len(boxes), np.int64) if labels is None else np.asarray(labels)}
    if difficult is not None:
        out["difficult"] = np.asarray(difficult, bool)
    return out


# Image 0: gts A = [0,0,10,10], B = [20,0,30,10]; image 1: gt C = [0,0,10,10] and a difficult D. npos = 3.
# Detections by score:
#   0.9 img0 = A            IoU 1 with A                      -> TP (A taken)
#   0.8 img0 = A            best gt A, already taken          -> FP (duplicate)
#   0.7 img1 = D            best gt is difficult              -> neither (left out)
#   0.6 img1 far away       no overlap                        -> FP
#   0.5 img1 [0,0,10,9]     IoU 90/100 = 0.9 with C           -> TP
#   0.4 img0 [20,0,30,5]    IoU 50/100 = 0.5 with B (>= 0.5)  -> TP
# Counted: TP FP FP TP TP -> recall 1/3 1/3 1/3 2/3 1, precision 1 1/2 1/3 1/2 3/5.
# All-point: envelope 1, .6, .6, .6, .6 -> AP = 1/3 * 1 + 1/3 * .6 + 1/3 * .6 = 0.7333...
# 11-point: recall >= 0, .1, .2, .30000000000000004 reach 1/3 -> precision 1 (4 points); .4 ... 1.0 -> max(.5, .6)
#   = .6 (7 points): AP = (4 + 7 * .6) / 11 = 0.74545...
HAND_PREDICTIONS = [
    _det([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 5]], [0.9, 0.8, 0.4]),
    _det([[50, 50, 60, 60], [100, 100, 110, 110], [0, 0, 10, 9]], [0.7, 0.6, 0.5]),
]
HAND_TARGETS = [_gt([[0, 0, 10, 10], [20, 0, 30, 10]]),
                _gt([[0, 0, 10, 10], [50, 50, 60, 60]], difficult=[False, True])]


def test_all_point_ap_by_hand():
    out = evaluate(HAND_PREDICTIONS, HAND_TARGETS, "voc")
    assert out["mAP"] == pytest.approx(1 / 3 + 0.2 + 0.2, abs=1e-12)
    assert out.num_gt == {1: 3}
    rec, prec = out.pr_curves()[1]
    np.testing.assert_allclose(rec, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(prec, [1, 1 / 2, 1 / 3, 1 / 2, 3 / 5])


def test_11_point_ap_by_hand():
    out = evaluate(HAND_PREDICTIONS, HAND_TARGETS, "voc07")
    assert out["mAP"] == pytest.approx((4 + 7 * 0.6) / 11, abs=1e-12)


def test_11_point_uses_py_faster_rcnn_recall_points():
    # 10 gts, one TP then nothing: recall 0.1 at precision 1 -> 11-point AP = 2/11 (points 0 and 0.1).
    # 3 TPs: recall exactly 3/10 = 0.29999999999999999, below np.arange's 0.30000000000000004: points 0, .1, .2
    # only, AP = 3/11 (an exact 0.3 would give 4/11).
    gts = [[10 * i, 0, 10 * i + 5, 5] for i in range(10)]
    targets = [_gt(gts)]
    assert evaluate([_det(gts[:1], [0.9])], targets, "voc07")["mAP"] == pytest.approx(2 / 11)
    assert evaluate([_det(gts[:3], [0.9, 0.8, 0.7])], targets, "voc07")["mAP"] == pytest.approx(3 / 11)
    # All-point for the same: recall 0.3 at precision 1 -> 0.3.
    assert evaluate([_det(gts[:3], [0.9, 0.8, 0.7])], targets, "voc")["mAP"] == pytest.approx(0.3)


def test_best_gt_taken_makes_a_duplicate_even_if_another_gt_is_free():
    # The VOC devkit looks only at the detection's best gt: A = [0,0,10,10] taken by the first detection,
    # the second [0,0,10,8] has IoU 80/100 = .8 with A and 70/90 = .778 with B = [0,1,10,9]: its best gt is A,
    # taken, so it is a FP although B is free and above the threshold.
    # By hand: TP, FP; recall 1/2, 1/2; precision 1, 1/2 -> all-point AP = 1/2.
    preds = [_det([[0, 0, 10, 10], [0, 0, 10, 8]], [0.9, 0.8])]
    targets = [_gt([[0, 0, 10, 10], [0, 1, 10, 9]])]
    out = evaluate(preds, targets, "voc")
    assert out["mAP"] == pytest.approx(0.5)


def test_plus_one_pixel_convention():
    # gt [0,0,3,3], detection [2,0,3,3]. Continuous boxes (+0): IoU = 1*3 / 9 = 0.333 -> FP, AP 0.
    # VOC pixel indices (+1, py-faster-rcnn): widths 4 and 2: IoU = 2*4 / 16 = 0.5 -> TP, AP 1.
    preds, targets = [_det([[2, 0, 3, 3]], [0.9])], [_gt([[0, 0, 3, 3]])]
    assert evaluate(preds, targets, "voc")["mAP"] == 0.0
    assert evaluate(preds, targets, "voc", plus_one=True)["mAP"] == pytest.approx(1.0)


def test_mean_over_classes_with_gt_and_configurable_threshold():
    # Class 1 found (AP 1), class 2 has gt but no detection (AP 0), class 3 only detections (-1, not averaged).
    preds = [_det([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8], labels=[1, 3])]
    targets = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], labels=[1, 2])]
    out = evaluate(preds, targets, "voc", class_names=["a", "b", "c"])
    assert out.per_class == {"a": pytest.approx(1.0), "b": 0.0, "c": -1.0}
    assert out["mAP"] == pytest.approx(0.5)
    # [0,0,10,6] on [0,0,10,10] has IoU 0.6: a hit at 0.5, not at 0.7.
    preds = [_det([[0, 0, 10, 6]], [0.9])]
    assert evaluate(preds, [_gt([[0, 0, 10, 10]])], "voc", iou_thresholds=0.7)["mAP"] == 0.0
    assert evaluate(preds, [_gt([[0, 0, 10, 10]])], "voc", iou_thresholds=[0.5])["mAP"] == pytest.approx(1.0)
    with pytest.raises(CnnlabError, match="VOC takes one IoU threshold"):
        evaluate(preds, [_gt([[0, 0, 10, 10]])], "voc", iou_thresholds=[0.5, 0.7])
    with pytest.raises(CnnlabError, match="evaluate again with iou_thresholds=0.7"):
        evaluate(preds, [_gt([[0, 0, 10, 10]])], "voc").pr_curves(iou=0.7)


def reference_voc(predictions, targets, use_07, thr=0.5):
    """A loop-by-loop reading of py-faster-rcnn's voc_eval (with >= and a stable score sort), per class."""
    labels = sorted({int(x) for t in targets for x in t["labels"]} | {int(x) for p in predictions for x in p["labels"]})
    aps = []
    for c in labels:
        recs = []
        for t in targets:
            keep = np.asarray(t["labels"]) == c
            diff = np.asarray(t.get("difficult", np.zeros(len(keep), bool)))[keep]
            recs.append({"bbox": np.asarray(t["boxes"], np.float64)[keep], "difficult": diff,
                         "det": [False] * int(keep.sum())})
        npos = sum(int((~r["difficult"]).sum()) for r in recs)
        dets = [(-float(s), i, j, b) for i, p in enumerate(predictions)
                for j, (b, s, lab) in enumerate(zip(np.asarray(p["boxes"], np.float64), p["scores"], p["labels"]))
                if int(lab) == c]
        dets.sort(key=lambda d: (d[0], d[1], d[2]))
        tp, fp = [], []
        for _, i, _, bb in dets:
            r = recs[i]
            ovmax, jmax = -np.inf, -1
            for j, g in enumerate(r["bbox"]):
                iw = max(min(bb[2], g[2]) - max(bb[0], g[0]), 0.0)
                ih = max(min(bb[3], g[3]) - max(bb[1], g[1]), 0.0)
                inter = iw * ih
                uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                ov = inter / uni if uni > 0 else 0.0
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax >= thr:
                if r["difficult"][jmax]:
                    continue
                if not r["det"][jmax]:
                    r["det"][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if npos == 0:
            continue
        tp, fp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07:
            ap = sum((max(prec[rec >= t]) if (rec >= t).any() else 0.0) / 11 for t in np.arange(0.0, 1.1, 0.1))
        else:
            mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
            for i in range(len(mpre) - 1, 0, -1):
                mpre[i - 1] = max(mpre[i - 1], mpre[i])
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
        aps.append(ap)
    return float(np.mean(aps)) if aps else -1.0


@st.composite
def voc_sets(draw):
    n_images, n_classes = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    coarse = draw(st.booleans())
    predictions, targets = [], []
    for _ in range(n_images):
        g, d = draw(st.integers(0, 6)), draw(st.integers(0, 12))
        xy = rng.integers(0, 60, (g, 2))
        gt = np.concatenate([xy, xy + rng.integers(1, 40, (g, 2))], 1).astype(np.float64)
        lab = rng.integers(1, n_classes + 1, g)
        src = rng.integers(0, max(g, 1), d)
        xy = rng.integers(0, 60, (d, 2))
        far = np.concatenate([xy, xy + rng.integers(1, 40, (d, 2))], 1)
        near = rng.random(d) < (0.7 if g else 0)
        boxes = np.where(near[:, None], (gt[src] if g else far) + rng.integers(-4, 5, (d, 4)), far).astype(float)
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        dl = np.where(near, lab[src] if g else 1, rng.integers(1, n_classes + 1, d))
        scores = rng.integers(0, 5, d) / 4 if coarse else rng.random(d)
        predictions.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                            "labels": torch.from_numpy(dl)})
        targets.append({"boxes": gt, "labels": lab, "difficult": rng.random(g) < 0.2})
    return predictions, targets


@settings(max_examples=40, deadline=None)
@given(voc_sets(), st.sampled_from(["voc", "voc07"]))
def test_equals_loop_reference_on_random_sets(data, metric):
    predictions, targets = data
    expected = reference_voc([{k: np.asarray(v) for k, v in p.items()} for p in predictions], targets,
                             use_07=metric == "voc07")
    assert evaluate(predictions, targets, metric)["mAP"] == pytest.approx(expected, abs=1e-9)
