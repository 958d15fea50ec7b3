"""cnnlab.detection.metrics, COCO: equal to pycocotools' COCOeval (bbox) on randomised sets, and hand cases."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from cnnlab._errors import CnnlabError  # noqa: E402
from cnnlab.detection.metrics import evaluate  # noqa: E402

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def pycocotools_eval(predictions, targets, categories):
    """The oracle: the same data as COCO dicts (xywh = x1, y1, x2 - x1, y2 - y1), ids from 1, run quietly."""
    images = [{"id": i + 1} for i in range(len(targets))]
    anns, results = [], []
    for i, t in enumerate(targets):
        boxes = _np(t["boxes"]).astype(np.float64).reshape(-1, 4)
        for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            area = float(_np(t["area"])[j]) if "area" in t else (x2 - x1) * (y2 - y1)
            crowd = int(_np(t["iscrowd"])[j]) if "iscrowd" in t else 0
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(_np(t["labels"])[j]),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": crowd})
    for i, p in enumerate(predictions):
        boxes = _np(p["boxes"]).astype(np.float64).reshape(-1, 4)
        for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), _np(p["scores"]).tolist(), _np(p["labels"]).tolist()):
            results.append({"image_id": i + 1, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": int(c)} for c in categories]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _per_class(precision: np.ndarray, t: slice | int = slice(None)) -> np.ndarray:
    p = precision[t, :, :, 0, 2].reshape(-1, precision.shape[1], precision.shape[2])
    return np.array([p[:, :, k][p[:, :, k] > -1].mean() if (p[:, :, k] > -1).any() else -1
                     for k in range(p.shape[2])])


def assert_equal_to_pycocotools(predictions, targets):
    ours = evaluate(predictions, targets, "coco")
    cats = ours.classes
    if sum(len(_np(p["scores"])) for p in predictions) == 0:
        # pycocotools' loadRes cannot take an empty result list: no detections means AP = AR = 0 for every
        # class with (non-crowd) gt in the range, -1 where there is none.
        assert all(v in (0.0, -1.0) for v in ours.values())
        assert (ours["AP"] == 0.0) == any(n > 0 for n in ours.num_gt.values())
        return ours
    ref = pycocotools_eval(predictions, targets, cats)
    np.testing.assert_allclose([ours[k] for k in KEYS], ref.stats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.details["precision"], ref.eval["precision"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.details["recall"], ref.eval["recall"], rtol=0, atol=1e-6)
    np.testing.assert_allclose([ours.per_class[c] for c in cats], _per_class(ref.eval["precision"]), atol=1e-6)
    np.testing.assert_allclose([ours.per_class_ap50[c] for c in cats], _per_class(ref.eval["precision"], 0),
                               atol=1e-6)
    return ours


@st.composite
def detection_sets(draw):
    """Images with 0..7 gts and 0..14 detections over 1..4 classes. Integer coordinates and scores on a coarse
    grid make exact IoU ties, IoUs on the thresholds and tied scores common; boxes span small/medium/large."""
    n_images = draw(st.integers(1, 6))
    n_classes = draw(st.integers(1, 4))
    gt_counts = draw(st.lists(st.integers(0, 7), min_size=n_images, max_size=n_images))
    dt_counts = draw(st.lists(st.integers(0, 14), min_size=n_images, max_size=n_images))
    crowd_rate = draw(st.sampled_from([0.0, 0.2, 0.5]))
    with_area = draw(st.booleans())
    coarse_scores = draw(st.booleans())
    as_torch = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    predictions, targets = [], []
    for g, d in zip(gt_counts, dt_counts):
        xy = rng.integers(0, 160, (g, 2))
        gt = np.concatenate([xy, xy + rng.integers(0, 121, (g, 2))], 1).astype(dtype)
        labels = rng.integers(1, n_classes + 1, g)
        target = {"boxes": gt, "labels": labels, "iscrowd": (rng.random(g) < crowd_rate).astype(np.int64)}
        if with_area:  # an annotated area (a mask's) need not be the box's: move it across the range limits
            target["area"] = (rng.uniform(0.2, 1.5, g) * (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).astype(dtype)
        near = rng.random(d) < (0.75 if g else 0.0)
        src = rng.integers(0, max(g, 1), d)
        jitter = rng.integers(-8, 9, (d, 4))
        xy = rng.integers(0, 160, (d, 2))
        far = np.concatenate([xy, xy + rng.integers(0, 121, (d, 2))], 1)
        boxes = np.where(near[:, None], (gt[src] if g else far) + jitter, far).astype(np.float64)
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        lab = np.where(near & (rng.random(d) < 0.85), labels[src] if g else 1, rng.integers(1, n_classes + 1, d))
        scores = rng.integers(0, 6, d) / 5 if coarse_scores else rng.random(d)
        pred = {"boxes": boxes.astype(dtype), "scores": scores.astype(dtype), "labels": lab.astype(np.int64)}
        if as_torch:
            pred = {k: torch.from_numpy(v) for k, v in pred.items()}
            target = {k: torch.from_numpy(v) for k, v in target.items()}
        predictions.append(pred)
        targets.append(target)
    return predictions, targets


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(detection_sets())
def test_equals_pycocotools_on_random_sets(data):
    assert_equal_to_pycocotools(*data)


def test_many_detections_per_image_are_cut_at_100_per_class_as_pycocotools():
    rng = np.random.default_rng(0)
    predictions, targets = [], []
    for _ in range(3):
        xy = rng.integers(0, 300, (40, 2))
        gt = np.concatenate([xy, xy + rng.integers(4, 90, (40, 2))], 1).astype(np.float32)
        labels = rng.integers(1, 3, 40)
        src = rng.integers(0, 40, 260)
        boxes = (gt[src] + rng.integers(-6, 7, (260, 4))).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        predictions.append({"boxes": boxes, "scores": rng.random(260).astype(np.float32),
                            "labels": np.where(rng.random(260) < 0.9, labels[src], 3)})
        targets.append({"boxes": gt, "labels": labels})
    ours = assert_equal_to_pycocotools(predictions, targets)
    assert ours["AR100"] > ours["AR10"] > ours["AR1"] > 0
    assert ours.per_class[3] == -1.0  # predicted but absent from the gt: -1, left out of the means


def test_iou_of_exactly_055_is_a_match_at_055():
    # gt 10 x 10, detection 10 x 5.5 inside it: IoU = 55 / 100 = 0.55, the double that linspace gives for
    # the second threshold. It matches at 0.50 and 0.55 only: precision 1 on 2 of the 10 thresholds, so by
    # hand AP = 2 / 10 = 0.2, AP50 = 1, AP75 = 0. With float32 thresholds (torchmetrics' old bug) the second
    # one is 0.550000011920929 > 0.55 and AP falls to 0.1.
    predictions = [{"boxes": np.array([[0.0, 0.0, 10.0, 5.5]]), "scores": np.array([0.9]), "labels": np.array([1])}]
    targets = [{"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "labels": np.array([1])}]
    ours = assert_equal_to_pycocotools(predictions, targets)
    assert ours["AP"] == pytest.approx(0.2, abs=1e-12)
    # (precision is tp / (tp + fp + eps), so "1" is 1 - 2.2e-16, as in pycocotools)
    assert (ours["AP50"], ours["AP75"], ours["AR100"]) == (pytest.approx(1.0), 0.0, pytest.approx(0.2))
    float32_thresholds = np.linspace(0.5, 0.95, 10, dtype=np.float32)
    assert evaluate(predictions, targets, iou_thresholds=float32_thresholds)["AP"] == pytest.approx(0.1)


def test_crowd_region_absorbs_detections_by_intersection_over_detection_area():
    # One ordinary gt and one crowd region 100 x 100. The first detection matches the gt exactly (TP); the
    # other two lie inside the crowd region: IoU there is intersection / detection area = 1, so both are
    # ignored (a crowd region is never used up). By hand: 1 TP, no FP: AP = 1; without the crowd flag the two
    # become FPs (they overlap no free gt) and AP drops.
    boxes = np.array([[0, 0, 20, 20], [200, 200, 210, 210], [250, 250, 260, 260]], np.float32)
    predictions = [{"boxes": boxes, "scores": np.array([0.5, 0.9, 0.8]), "labels": np.array([1, 1, 1])}]
    targets = [{"boxes": np.array([[0, 0, 20, 20], [190, 190, 290, 290]], np.float32), "labels": np.array([1, 1]),
                "iscrowd": np.array([0, 1])}]
    ours = assert_equal_to_pycocotools(predictions, targets)
    assert ours["AP"] == pytest.approx(1.0) and ours.num_gt[1] == 1
    targets[0]["iscrowd"] = np.array([0, 0])
    assert evaluate(predictions, targets)["AP"] < 0.9


def test_tied_scores_keep_image_order_as_pycocotools():
    # Same score everywhere: the FP in image 0 comes before the TP in image 1, so precision at the only
    # recall point is 1/2 (by hand: AP50 = 0.5); swapping the images gives 1.
    fp = {"boxes": np.array([[50.0, 50, 60, 60]]), "scores": np.array([0.5]), "labels": np.array([1])}
    tp = {"boxes": np.array([[0.0, 0, 10, 10]]), "scores": np.array([0.5]), "labels": np.array([1])}
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}
    gt = {"boxes": np.array([[0.0, 0, 10, 10]]), "labels": np.array([1])}
    assert assert_equal_to_pycocotools([fp, tp], [empty, gt])["AP50"] == pytest.approx(0.5, abs=1e-12)
    assert assert_equal_to_pycocotools([tp, fp], [gt, empty])["AP50"] == pytest.approx(1.0)


def test_empty_inputs():
    assert all(v == -1.0 for v in evaluate([], [], "coco").values())
    no_box = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    no_det = {**no_box, "scores": torch.zeros(0)}
    assert all(v == -1.0 for v in evaluate([no_det, no_det], [no_box, no_box]).values())
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}
    out = evaluate([no_det, no_det], [gt, no_box], class_names=["cat", "dog"])
    assert out["AP"] == 0.0 and out["AR100"] == 0.0 and out["APl"] == -1.0
    assert out.per_class == {"cat": -1.0, "dog": 0.0}


def test_class_names_pr_curves_and_as_dict():
    predictions = [{"boxes": np.array([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "scores": np.array([0.9, 0.8]),
                    "labels": np.array([1, 1])}]
    targets = [{"boxes": np.array([[0.0, 0, 10, 10], [50, 50, 60, 60]]), "labels": np.array([1, 1])}]
    out = evaluate(predictions, targets, class_names=["a", "b"])
    rec, prec = out.pr_curves(iou=0.5)["a"]
    # By hand: TP then FP, recall 1/2 at precision 1: precision 1 at the 51 recall points 0, 0.01, ..., 0.5
    # and 0 beyond, so AP50 = 51 / 101.
    np.testing.assert_allclose(prec, np.where(rec <= 0.5, 1.0, 0.0), atol=1e-12)
    assert "b" not in out.pr_curves()  # no gt, no curve
    flat = out.as_dict(per_class=True)
    assert flat["AP/a"] == out.per_class["a"] and flat["AP/b"] == -1.0 and flat["AP50/a"] == pytest.approx(51 / 101)
    assert "a" in out.table()
    with pytest.raises(CnnlabError, match="no PR curve at IoU 0.52"):
        out.pr_curves(iou=0.52)


@pytest.mark.parametrize("change, match", [
    (lambda p, t: p.pop(), r"predictions has 1 images but targets has 2"),
    (lambda p, t: p[1].update(boxes=np.zeros((2, 5))), r"predictions\[1\]\['boxes'\] has shape \(2, 5\)"),
    (lambda p, t: t[1].update(boxes=np.array([[0, 0, np.nan, 4.0]])), r"targets\[1\]\['boxes'\]\[0\].*not finite"),
    (lambda p, t: p[0].update(boxes=np.array([[5.0, 0, 4, 4], [0, 0, 1, 1]])),
     r"predictions\[0\]\['boxes'\]\[0\].*x2 < x1"),
    (lambda p, t: p[0].update(scores=np.array([0.5])), r"predictions\[0\]\['scores'\] has 1 entries.*2 boxes"),
    (lambda p, t: t[0].pop("labels"), r"targets\[0\] has no 'labels'"),
    (lambda p, t: t[0].update(labels=np.array([1.5])), r"targets\[0\]\['labels'\] holds non-integer"),
    (lambda p, t: t[0].update(area=np.array([-1.0])), r"targets\[0\]\['area'\]\[0\] is negative"),
    (lambda p, t: p[0].update(labels=np.array([1, 7])), r"predictions\[0\]\['labels'\] holds 7.*1..2"),
])
def test_bad_input_names_the_image_and_field(change, match):
    predictions = [{"boxes": np.array([[0.0, 0, 4, 4], [1, 1, 3, 3]]), "scores": np.array([0.5, 0.4]),
                    "labels": np.array([1, 2])}, {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    targets = [{"boxes": np.array([[0.0, 0, 4, 4]]), "labels": np.array([1])},
               {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}]
    change(predictions, targets)
    with pytest.raises(CnnlabError, match=match):
        evaluate(predictions, targets, class_names=["a", "b"])


def test_unknown_metric_and_options():
    with pytest.raises(CnnlabError, match="unknown detection metric 'cocoo'.*did you mean coco"):
        evaluate([], [], "cocoo")
    with pytest.raises(CnnlabError, match="plus_one is a VOC convention"):
        evaluate([], [], "coco", plus_one=True)
    with pytest.raises(CnnlabError, match="expected IoU values in"):
        evaluate([], [], "coco", iou_thresholds=[0.5, 1.5])


def test_equal_iou_goes_to_the_last_gt_as_pycocotools():
    # Detection 1 has IoU exactly 0.5 with both gts A = [0,0,10,10] and B = [5,0,15,10] (50 / 100 each);
    # pycocotools moves to a later gt on >=, so it takes B, and detection 2 (= A) then takes A: two TPs at
    # IoU 0.5, AP50 = 1 by hand. Taking the first gt instead would leave detection 2 a duplicate: 51 / 101.
    predictions = [{"boxes": np.array([[5.0, 0, 10, 10], [0, 0, 10, 10]]), "scores": np.array([0.9, 0.8]),
                    "labels": np.array([1, 1])}]
    targets = [{"boxes": np.array([[0.0, 0, 10, 10], [5, 0, 15, 10]]), "labels": np.array([1, 1])}]
    assert assert_equal_to_pycocotools(predictions, targets)["AP50"] == pytest.approx(1.0)


def test_half_precision_tensors_and_pickle():
    import pickle

    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 32]])
    predictions = [{"boxes": boxes.bfloat16(), "scores": torch.tensor([0.9, 0.3]).half(),
                    "labels": torch.tensor([1, 2])}]
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
    out = evaluate(predictions, targets, class_names=["a", "b"])
    as_float = [{k: (v.float() if v.is_floating_point() else v) for k, v in predictions[0].items()}]
    assert out == evaluate(as_float, targets, class_names=["a", "b"])
    back = pickle.loads(pickle.dumps(out))
    assert back == out and back.per_class == out.per_class and back.metric == "coco"
