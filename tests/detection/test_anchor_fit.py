"""Anchors by k-means with the 1 - IoU distance: hand-checked IoUs, recovered clusters, refused settings."""
import math

import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.detection.anchor_fit import (anchor_recall, box_size_stats, check_anchors, fit_anchors, mean_best_iou,
                                         wh_iou)


def test_wh_iou_by_hand():
    # (2, 3) and (4, 1) at one centre: the overlap is min(2, 4) x min(3, 1) = 2, the union 6 + 4 - 2 = 8
    iou = wh_iou(torch.tensor([[2.0, 3.0], [4.0, 1.0]]), torch.tensor([[4.0, 1.0], [2.0, 3.0], [1.0, 1.5]]))
    # (2, 3) vs (1, 1.5): 1.5 / (6 + 1.5 - 1.5) = 0.25; (4, 1) vs (1, 1.5): 1 / (4 + 1.5 - 1) = 1 / 4.5
    expected = torch.tensor([[0.25, 1.0, 0.25], [1.0, 0.25, 1 / 4.5]])
    torch.testing.assert_close(iou, expected)


def _clusters(centres, per_cluster=60, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    wh = [torch.tensor(c) * (1 + spread * (2 * torch.rand(per_cluster, 2, generator=g) - 1)) for c in centres]
    return torch.cat(wh)


def test_kmeans_recovers_the_cluster_shapes_sorted_by_area():
    shapes = [(100.0, 60.0), (10.0, 20.0), (40.0, 40.0)]
    anchors = fit_anchors(_clusters(shapes), k=3, seed=0)
    expected = torch.tensor(sorted(shapes, key=lambda s: s[0] * s[1]))
    # the boxes are spread +-5 % around each shape: the cluster means lie within 2 % of it
    torch.testing.assert_close(anchors, expected, rtol=0.02, atol=0)
    assert anchors.dtype == torch.float32 and anchors.shape == (3, 2)


def test_kmeans_uses_the_iou_distance_not_euclidean():
    # four equal groups of squares, sides 4, 8, 100, 120, into k=3. Euclidean k-means would merge 4 and 8 (4 px
    # apart) and keep 100 and 120 apart (20 px); with 1 - IoU, 4 vs 8 is far (IoU 0.25) and 100 vs 120 near
    # (0.69): the best fit is (4, 4), (8, 8) and the mean of the large ones, (110, 110) (mean best IoU 0.917,
    # against 0.752 for Euclidean's (6, 6), (100, 100), (120, 120))
    wh = _clusters([(4.0, 4.0), (8.0, 8.0), (100.0, 100.0), (120.0, 120.0)], spread=0.01)
    anchors = fit_anchors(wh, k=3, seed=0)
    torch.testing.assert_close(anchors, torch.tensor([[4.0, 4.0], [8.0, 8.0], [110.0, 110.0]]), rtol=0.01, atol=0)
    assert mean_best_iou(anchors, wh) == pytest.approx((1 + 1 + 100 ** 2 / 110 ** 2 + 110 ** 2 / 120 ** 2) / 4,
                                                       abs=0.01)


def test_kmeans_is_deterministic_with_a_seed():
    wh = torch.rand(300, 2, generator=torch.Generator().manual_seed(1)) * 90 + 10
    a, b = fit_anchors(wh, k=9, seed=7), fit_anchors(wh, k=9, seed=7)
    assert torch.equal(a, b)
    area = a[:, 0] * a[:, 1]
    assert torch.all(area[1:] >= area[:-1])


def test_mean_best_iou_and_recall_by_hand():
    anchors = torch.tensor([[10.0, 10.0]])
    boxes = torch.tensor([[10.0, 10.0], [20.0, 20.0], [5.0, 10.0]])  # IoUs 1, 100 / 400, 50 / 100
    assert mean_best_iou(anchors, boxes) == pytest.approx((1 + 0.25 + 0.5) / 3)
    assert anchor_recall(anchors, boxes, threshold=0.5) == pytest.approx(2 / 3)
    assert math.isnan(mean_best_iou(anchors, torch.zeros(0, 2)))


def test_check_anchors_refuses_anchors_that_match_no_box_and_shows_the_data():
    boxes = torch.tensor([[20.0, 30.0], [40.0, 50.0], [64.0, 60.0]])
    fractions = torch.tensor([[0.1, 0.2], [0.3, 0.3], [0.5, 0.4]])  # relative sizes given where pixels are expected
    with pytest.raises(CnnlabError) as info:
        check_anchors(fractions, boxes, setting="model.options.anchors")
    message = str(info.value)
    assert "model.options.anchors" in message and "no training box" in message
    assert "3 boxes" in message and "width min/median/max 20.0/40.0/64.0 px" in message
    assert "height min/median/max 30.0/50.0/60.0 px" in message and "best IoU reached" in message


def test_check_anchors_refuses_too_few_matches_and_passes_good_anchors():
    boxes = torch.tensor([[10.0, 10.0], [100.0, 100.0], [110.0, 100.0]])
    with pytest.raises(CnnlabError, match="only 33% of the training boxes"):
        check_anchors(torch.tensor([[10.0, 10.0]]), boxes, setting="anchors", min_recall=0.5)
    stats = check_anchors(torch.tensor([[10.0, 10.0], [105.0, 100.0]]), boxes, setting="anchors")
    assert stats["boxes"] == 3 and stats["recall"] == 1.0 and stats["best_iou"] == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(CnnlabError, match="needs training boxes"):
        fit_anchors(torch.zeros(0, 2))
    with pytest.raises(CnnlabError, match="distinct box shapes"):
        fit_anchors(torch.tensor([[5.0, 5.0]] * 20), k=9)
    with pytest.raises(CnnlabError, match=r"\(N, 2\)"):
        fit_anchors(torch.ones(5, 4))
    with pytest.raises(CnnlabError, match="positive"):
        fit_anchors(torch.tensor([[5.0, -1.0], [2.0, 3.0]]), k=1)
    assert box_size_stats(torch.zeros(0, 2)) == "0 boxes"


def test_fixed_anchor_detectors_refuse_anchors_that_match_no_training_box():
    """Faster R-CNN, RetinaNet and SSD check their (user-set) anchors against the data's boxes, in input pixels."""
    import cnnlab

    boxes = torch.tensor([[10.0, 10.0, 70.0, 70.0], [0.0, 0.0, 40.0, 80.0]])  # in a 256 x 256 image
    for name, options, setting in [
        ("faster_rcnn", {"backbone": "simple_cnn_bn", "min_size": 128, "max_size": 128}, "anchor_sizes"),
        ("retinanet", {"backbone": "simple_cnn_bn", "min_size": 128, "max_size": 128}, "anchor_scales"),
        ("ssd", {"backbone": "simple_cnn_bn", "size": 128}, "scales"),
    ]:
        model = cnnlab.create_model(name, num_classes=3, **options)
        wh = model.input_box_wh(boxes, (256, 256))  # resized by half
        assert torch.allclose(wh, torch.tensor([[30.0, 30.0], [20.0, 40.0]]))
        assert model.fit_to_data(wh.repeat(10, 1))["recall"] > 0
        with pytest.raises(CnnlabError, match=rf"{setting}.*match no training box.*the data: 20 boxes"):
            model.fit_to_data(torch.tensor([[900.0, 2.0]]).repeat(20, 1))
