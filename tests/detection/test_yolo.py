"""YOLOv1 and YOLOv3: target encoding and assignment against hand-computed cells, the losses on hand-built
cases, training and evaluation through torchvision's detection interface at small sizes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.detection.yolov1 import (GridTargets, YOLOv1Loss, YOLOv1LossConfig, cell_boxes_to_xyxy,
                                     encode_grid_targets)
from cnnlab.detection.yolov3 import COCO_ANCHORS, YOLOv3Loss, YOLOv3LossConfig, assign_targets, decode_boxes

torch.set_num_threads(1)


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


# -- YOLOv1: the grid -------------------------------------------------------------------------------------------
def test_grid_encoding_by_hand():
    # 448 x 448, S = 7: cells of 64 px. The box (100, 200)-(180, 300) has its centre at (140, 250): column
    # floor(140 / 64) = 2, row floor(250 / 64) = 3; x = 140 / 64 - 2 = 0.1875, y = 250 / 64 - 3 = 0.90625;
    # w = 80 / 448, h = 100 / 448 of the image
    t = encode_grid_targets(torch.tensor([[100.0, 200.0, 180.0, 300.0]]), torch.tensor([2]), (448, 448), 7, 3)
    assert t.obj.sum() == 1 and bool(t.obj[3, 2])
    torch.testing.assert_close(t.box[3, 2], torch.tensor([0.1875, 0.90625, math.sqrt(80 / 448), math.sqrt(100 / 448)]))
    torch.testing.assert_close(t.cls[3, 2], torch.tensor([0.0, 1.0, 0.0]))
    assert t.box[~t.obj].abs().sum() == 0


def test_grid_encoding_on_a_non_square_image_edges_and_shared_cells():
    # (h, w) = (200, 400), S = 4: cells of 100 x 50 px
    boxes = torch.tensor([[0.0, 0.0, 100.0, 50.0],      # centre (50, 25): cell (0, 0), x = y = 0.5, w = h = 1/4
                          [300.0, 150.0, 400.0, 200.0],  # centre (350, 175): cell (3, 3), x = y = 0.5
                          [10.0, 10.0, 30.0, 30.0],      # centre (20, 20): cell (0, 0) too, but smaller: dropped
                          [380.0, 180.0, 400.0, 200.0]])  # centre (390, 190) in cell (3, 3), smaller than box 1
    t = encode_grid_targets(boxes, torch.tensor([1, 2, 3, 1]), (200, 400), 4, 3)
    assert t.obj.nonzero().tolist() == [[0, 0], [3, 3]]
    torch.testing.assert_close(t.box[0, 0], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(t.box[3, 3], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert t.cls[0, 0].argmax() == 0 and t.cls[3, 3].argmax() == 1
    # a centre on the far edge belongs to the last cell
    edge = encode_grid_targets(torch.tensor([[350.0, 150.0, 450.0, 250.0]]), torch.tensor([1]), (200, 400), 4, 1)
    assert bool(edge.obj[3, 3]) and edge.box[3, 3, 0] == pytest.approx(1.0)
    # cell boxes decode back to the image-relative box
    torch.testing.assert_close(cell_boxes_to_xyxy(t.box.unsqueeze(-2))[0, 0, 0], torch.tensor([0.0, 0.0, 0.25, 0.25]))


def _perfect(grid: GridTargets, boxes_per_cell: int = 2):
    """Predictions equal to the truth: predictor 0 of each object cell on the truth (confidence 1), predictor 1 a
    small box at the cell's corner (confidence 0), class probabilities the one-hot truth."""
    s = grid.obj.shape[-1]
    boxes = torch.zeros(*grid.obj.shape, boxes_per_cell, 4)
    boxes[..., 1, :] = torch.tensor([0.0, 0.0, 0.05, 0.05])
    boxes[..., 0, :] = torch.where(grid.obj[..., None], grid.box, torch.tensor([0.5, 0.5, 0.1, 0.1]))
    confidence = torch.zeros(*grid.obj.shape, boxes_per_cell)
    confidence[..., 0] = grid.obj.float()
    probs = torch.where(grid.obj[..., None], grid.cls, torch.full_like(grid.cls, 1 / grid.cls.shape[-1]))
    assert boxes.shape[-3] == s
    return boxes, confidence, probs


def _one_box_grid():
    # 2 images, S = 4, C = 2; image 0 has one box of a quarter of the image, centred in cell (1, 1); image 1 none
    g0 = encode_grid_targets(torch.tensor([[24.0, 24.0, 56.0, 56.0]]), torch.tensor([1]), (128, 128), 4, 2)
    g1 = encode_grid_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), (128, 128), 4, 2)
    return GridTargets.stack([g0, g1])


def test_yolov1_loss_is_zero_on_a_perfect_prediction():
    grid = _one_box_grid()
    losses = YOLOv1Loss(YOLOv1LossConfig())(*_perfect(grid), grid)
    assert set(losses) == {"loss_box", "loss_obj", "loss_noobj", "loss_cls"}
    for name, value in losses.items():
        assert value.item() == pytest.approx(0.0, abs=1e-7), name


def test_yolov1_loss_terms_by_hand():
    grid = _one_box_grid()
    n = 2  # the loss is summed over cells and averaged over the images
    loss = YOLOv1Loss(YOLOv1LossConfig(rescore=False))  # confidence target 1: the terms stay apart

    boxes, confidence, probs = _perfect(grid)
    boxes[0, 1, 1, 0, 0] += 0.1  # x of the responsible predictor off by 0.1 cell
    boxes[0, 1, 1, 0, 3] -= 0.2  # and sqrt(h) by 0.2
    assert loss(boxes, confidence, probs, grid)["loss_box"].item() == pytest.approx(5 * (0.01 + 0.04) / n)

    boxes, confidence, probs = _perfect(grid)
    confidence[0, 1, 1, 1] = 0.4  # the object cell's other predictor
    confidence[1, 2, 3, 0] = 0.2  # a predictor of an empty cell
    out = loss(boxes, confidence, probs, grid)
    assert out["loss_noobj"].item() == pytest.approx(0.5 * (0.16 + 0.04) / n)
    assert out["loss_obj"].item() == pytest.approx(0.0, abs=1e-7)

    boxes, confidence, probs = _perfect(grid)
    confidence[0, 1, 1, 0] = 0.7  # the responsible predictor under-confident
    probs[0, 1, 1] = torch.tensor([0.7, 0.3])  # and the cell's class probabilities off
    probs[1, 0, 0] = torch.tensor([0.9, 0.1])  # (empty cells' classes cost nothing)
    out = loss(boxes, confidence, probs, grid)
    assert out["loss_obj"].item() == pytest.approx(0.09 / n)
    assert out["loss_cls"].item() == pytest.approx((0.09 + 0.09) / n)


def test_yolov1_responsible_predictor_and_rescored_confidence():
    grid = _one_box_grid()
    boxes, confidence, probs = _perfect(grid)
    # predictor 0 moved 0.25 cell right (IoU with the truth: the overlap is (0.25 - 0.25 / 4) x 0.25 of the image
    # on a truth of 0.25 x 0.25), predictor 1 put on the truth but 0.1 cell lower: higher IoU, so it is responsible
    boxes[0, 1, 1, 0, 0] += 0.25
    boxes[0, 1, 1, 1] = grid.box[0, 1, 1] + torch.tensor([0.0, 0.1, 0.0, 0.0])
    confidence[0, 1, 1] = torch.tensor([0.0, 1.0])
    out = YOLOv1Loss(YOLOv1LossConfig())(boxes, confidence, probs, grid)
    assert out["loss_box"].item() == pytest.approx(5 * 0.01 / 2)  # only predictor 1's y error
    side, shift = 0.25, 0.1 / 4  # image units: the box side and the shift of predictor 1
    inter = side * (side - shift)
    iou = inter / (2 * side ** 2 - inter)
    assert out["loss_obj"].item() == pytest.approx((1.0 - iou) ** 2 / 2, rel=1e-5)  # target: its IoU (rescore)
    assert out["loss_noobj"].item() == pytest.approx(0.0, abs=1e-7)  # predictor 0 has confidence 0


class _ConstantHead(nn.Module):
    def __init__(self, raw):
        super().__init__()
        self.raw = raw

    def forward(self, x):
        return self.raw.expand(x.shape[0], *self.raw.shape)


def test_yolov1_detections_by_hand_at_each_input_size():
    # S = 2, B = 1, one class. Only cell (0, 0) is confident: x = y = sigmoid(0) = 0.5, sqrt(w) = sqrt(h) = 0.5,
    # so the box is centred at (0.25, 0.25) of the image with a quarter of its side: (0.125, 0.125)-(0.375, 0.375)
    model = cnnlab.create_model("yolov1", num_classes=2, backbone="resnet18", size=64, grid_size=2,
                                boxes_per_cell=1, head="conv", score_thresh=0.5).eval()
    raw = torch.zeros(2, 2, 6)
    raw[..., 4] = -10.0
    raw[0, 0, 4] = 10.0
    model.head = _ConstantHead(raw)
    images = [torch.rand(3, 200, 100), torch.rand(3, 64, 96)]
    with torch.no_grad():
        out = model(images)
    assert [sorted(o) for o in out] == [["boxes", "labels", "scores"]] * 2
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[12.5, 25.0, 37.5, 75.0]]))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[12.0, 8.0, 36.0, 24.0]]))
    assert out[0]["labels"].tolist() == [1]
    assert out[0]["scores"].item() == pytest.approx(1 / (1 + math.exp(-10.0)))  # confidence x class probability 1


# -- YOLOv1: the model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1():
    torch.manual_seed(0)
    return cnnlab.create_model("yolov1", num_classes=3, backbone="resnet18", size=128, grid_size=4)


def test_yolov1_trains_with_and_without_boxes(v1):
    v1.train()
    images = [torch.rand(3, 120, 100), torch.rand(3, 128, 128)]
    targets = [_target([[10, 20, 60, 90], [70, 10, 95, 40]], [1, 2]), _target([], [])]
    losses = v1(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_noobj", "loss_cls"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in v1.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    v1.zero_grad()
    empty = v1(images, [_target([], []), _target([], [])])  # no box in the batch: only the no-object term
    assert all(torch.isfinite(v) for v in empty.values()) and empty["loss_box"] == 0 and empty["loss_cls"] == 0


def test_yolov1_eval_returns_the_interface_dicts(v1):
    v1.eval()
    images = [torch.rand(3, 90, 140), torch.rand(3, 128, 64)]
    with torch.no_grad():
        out = v1(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert o["boxes"].shape[1] == 4 and o["labels"].dtype == torch.int64 and len(o["scores"]) <= 100
        h, w = im.shape[-2:]
        assert (o["boxes"][:, 0::2] <= w + 1e-4).all() and (o["boxes"][:, 1::2] <= h + 1e-4).all()
        assert ((o["labels"] >= 1) & (o["labels"] <= 2)).all()
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])


def test_yolov1_bad_options():
    with pytest.raises(CnnlabError, match="lambda_cord.*did you mean lambda_coord"):
        cnnlab.create_model("yolov1", num_classes=3, lambda_cord=5)
    with pytest.raises(CnnlabError, match="size=100"):
        cnnlab.create_model("yolov1", num_classes=3, size=100)
    with pytest.raises(CnnlabError, match="head must be"):
        cnnlab.create_model("yolov1", num_classes=3, size=64, head="mlp")
    with pytest.raises(CnnlabError, match="grid_size <= 2"):
        cnnlab.create_model("yolov1", num_classes=3, size=64, grid_size=4, head="conv")


# -- YOLOv3: assignment and loss ---------------------------------------------------------------------------------
ANCHORS = torch.tensor(COCO_ANCHORS, dtype=torch.float32)
STRIDES, GRIDS = (8, 16, 32), [(52, 52), (26, 26), (13, 13)]  # 416 px


def test_yolov3_assignment_by_hand():
    # a 40 x 40 box centred at (100, 60). Shape IoUs with the anchors: (33, 23) 759 / 1600 = 0.474,
    # (30, 61) 1200 / 2230 = 0.538, (62, 45) 1600 / 2790 = 0.573 (the best), (59, 119) 1600 / 7021 = 0.228.
    # (62, 45) is anchor 1 of scale 1 (stride 16): cell column floor(100 / 16) = 6, row floor(60 / 16) = 3,
    # offsets (0.25, 0.75), t_w = log(40 / 62), t_h = log(40 / 45)
    boxes = torch.tensor([[80.0, 40.0, 120.0, 80.0],
                          [50.0, 60.0, 350.0, 360.0],   # 300 x 300: best (373, 326), IoU 0.740: scale 2, anchor 2
                          [0.0, 0.0, 12.0, 14.0]])      # 12 x 14: best (10, 13), IoU 130 / 168: scale 0, anchor 0
    out = assign_targets(boxes, torch.tensor([3, 1, 2]), ANCHORS, STRIDES, GRIDS)
    assert [t.assigned.nonzero().tolist() for t in out] == [[[0, 0, 0]], [[3, 6, 1]], [[6, 6, 2]]]
    torch.testing.assert_close(out[1].txy[3, 6, 1], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out[1].twh[3, 6, 1], torch.log(torch.tensor([40 / 62, 40 / 45])))
    assert out[1].label[3, 6, 1] == 3 and out[2].label[6, 6, 2] == 1
    # the 300 px box: centre (200, 210) / 32 = (6.25, 6.5625) in cell (6, 6)
    torch.testing.assert_close(out[2].txy[6, 6, 2], torch.tensor([0.25, 0.5625]))
    torch.testing.assert_close(out[0].txy[0, 0, 0], torch.tensor([0.75, 0.875]))
    torch.testing.assert_close(out[2].box[6, 6, 2], boxes[1])
    # match_thresh 0.5: the 40 px box also takes (30, 61) (0.538 > 0.5), anchor 0 of scale 1, not (33, 23) (0.474)
    more = assign_targets(boxes[:1], torch.tensor([3]), ANCHORS, STRIDES, GRIDS, match_thresh=0.5)
    assert more[1].assigned.nonzero().tolist() == [[3, 6, 0], [3, 6, 1]] and not more[0].assigned.any()
    # a 30 x 30 box partly outside the image, centre (-5, -5): best (33, 23) (IoU 690 / 969), scale 0, anchor 2,
    # in the nearest cell (0, 0) with its offsets clamped to the cell
    out = assign_targets(torch.tensor([[-20.0, -20.0, 10.0, 10.0]]), torch.tensor([1]), ANCHORS, STRIDES, GRIDS)
    assert out[0].assigned.nonzero().tolist() == [[0, 0, 2]]
    assert out[0].txy[0, 0, 2].tolist() == [0.0, 0.0]


def _raw_outputs(grids, num_classes, value=-4.0):
    return [torch.full((1, h, w, 3, 5 + num_classes), value) for h, w in grids]


def test_yolov3_loss_by_hand():
    grids, strides = [(4, 4), (2, 2), (1, 1)], (8, 16, 32)  # a 32 px image
    anchors = torch.tensor([[4.0, 4.0], [6.0, 6.0], [8.0, 8.0], [12.0, 12.0], [16.0, 16.0], [20.0, 20.0],
                            [24.0, 24.0], [28.0, 28.0], [32.0, 32.0]])
    truth = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # 16 x 16 at (8, 8): anchor 4 = scale 1, anchor 1, cell (0, 0)
    targets = [assign_targets(truth, torch.tensor([2]), anchors, strides, grids)]
    assert targets[0][1].assigned[0, 0, 1]
    outputs = _raw_outputs(grids, 2)
    # the assigned prediction: t_x = t_y = 0 (offset 0.5: exact), t_w = log(2) - log(16 / 16) off by log 2,
    # objectness logit 2, class logits (-1, 3) for class 2
    outputs[1][0, 0, 0, 1] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0, 2.0, -1.0, 3.0])
    anchor_list = list(anchors.split(3))
    losses = YOLOv3Loss(YOLOv3LossConfig())(outputs, anchor_list, strides, targets, [truth])
    softplus = F.softplus
    assert losses["loss_box"].item() == pytest.approx(math.log(2.0) ** 2, rel=1e-5)
    assert losses["loss_obj"].item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)  # BCE(2, 1)
    # BCE(-1, 0) + BCE(3, 1) = softplus(-1) + softplus(-3)
    assert losses["loss_cls"].item() == pytest.approx(math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-3.0)), rel=1e-5)
    # no-object: the 63 - 1 unassigned predictions at logit -4 (their t_w = t_h = -4 make tiny boxes), except one
    # whose decoded box lies on the truth (scale 1, anchor 2 of 20 px scaled by 16 / 20, in cell (0, 0)): IoU 1
    # > 0.5, so it is ignored
    outputs[1][0, 0, 0, 2, :4] = torch.tensor([0.0, 0.0, math.log(16 / 20), math.log(16 / 20)])
    torch.testing.assert_close(decode_boxes(outputs[1][0], anchor_list[1], 16)[0, 0, 2], truth[0])
    losses = YOLOv3Loss(YOLOv3LossConfig())(outputs, anchor_list, strides, targets, [truth])
    assert losses["loss_noobj"].item() == pytest.approx(61 * softplus(torch.tensor(-4.0)).item(), rel=1e-5)
    ignore_none = YOLOv3Loss(YOLOv3LossConfig(ignore_thresh=1.0))(outputs, anchor_list, strides, targets, [truth])
    assert ignore_none["loss_noobj"].item() == pytest.approx(62 * softplus(torch.tensor(-4.0)).item(), rel=1e-5)


def test_yolov3_loss_without_boxes_is_only_the_no_object_term():
    grids = [(4, 4), (2, 2), (1, 1)]
    anchors = ANCHORS / 13
    targets = [assign_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), anchors, STRIDES, grids)]
    losses = YOLOv3Loss(YOLOv3LossConfig(box_loss="giou"))(_raw_outputs(grids, 3), list(anchors.split(3)), STRIDES,
                                                           targets, [torch.zeros(0, 4)])
    assert losses["loss_box"] == 0 and losses["loss_obj"] == 0 and losses["loss_cls"] == 0
    assert losses["loss_noobj"].item() == pytest.approx(63 * F.softplus(torch.tensor(-4.0)).item(), rel=1e-5)


# -- YOLOv3: the model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v3():
    torch.manual_seed(0)
    return cnnlab.create_model("yolov3", num_classes=3, backbone="resnet18", size=128, neck_channels=32)


def _train_boxes():
    g = torch.Generator().manual_seed(0)
    return torch.rand(200, 2, generator=g) * 50 + 10  # 10..60 px


def test_yolov3_kmeans_anchors_must_be_fitted_before_training():
    fresh = cnnlab.create_model("yolov3", num_classes=3, backbone="resnet18", size=64, neck_channels=16).train()
    with pytest.raises(CnnlabError, match="fit_to_data"):
        fresh([torch.rand(3, 64, 64)], [_target([[1, 1, 30, 30]], [1])])
    stats = fresh.fit_to_data(_train_boxes())
    assert len(stats["anchors"]) == 9 and stats["recall"] == 1.0 and stats["mean_best_iou"] > 0.6
    area = fresh.anchors.prod(dim=1)
    assert torch.all(area[1:] >= area[:-1])
    # the fitted anchors and the flag travel in the state_dict
    other = cnnlab.create_model("yolov3", num_classes=3, backbone="resnet18", size=64, neck_channels=16)
    other.load_state_dict(fresh.state_dict())
    assert torch.equal(other.anchors, fresh.anchors) and bool(other.anchors_ready)


def test_yolov3_trains_and_evaluates(v3):
    v3.fit_to_data(_train_boxes())
    v3.train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 100, 150)]
    targets = [_target([[10, 20, 60, 90], [70, 10, 95, 40]], [1, 2]), _target([], [])]
    losses = v3(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_noobj", "loss_cls"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in v3.parameters() if p.requires_grad)
    v3.zero_grad()
    empty = v3(images, [_target([], []), _target([], [])])
    assert all(torch.isfinite(v) for v in empty.values())
    v3.eval()
    v3.postprocess_config = type(v3.postprocess_config)(score_thresh=0.0, detections_per_img=20)
    with torch.no_grad():
        out = v3(images)
    for o, im in zip(out, images):
        assert sorted(o) == ["boxes", "labels", "scores"] and len(o["boxes"]) == 20
        h, w = im.shape[-2:]
        assert (o["boxes"][:, 0::2] <= w + 1e-4).all() and (o["boxes"][:, 1::2] <= h + 1e-4).all()
        assert ((o["labels"] >= 1) & (o["labels"] <= 2)).all()


def test_yolov3_input_box_wh_is_in_model_pixels(v3):
    wh = v3.input_box_wh(torch.tensor([[0.0, 0.0, 50.0, 20.0]]), (200, 100))  # a 100 x 200 image -> 128 x 128
    torch.testing.assert_close(wh, torch.tensor([[64.0, 12.8]]))


def test_yolov3_refuses_anchor_settings_that_cannot_work():
    with pytest.raises(CnnlabError, match=r"model\.options\.anchors.*6 anchors.*takes 9"):
        cnnlab.create_model("yolov3", num_classes=3, size=64, anchors=[[10, 10]] * 6)
    with pytest.raises(CnnlabError, match="'kmeans'"):
        cnnlab.create_model("yolov3", num_classes=3, size=64, anchors="k-means")
    with pytest.raises(CnnlabError, match=r"'coco' is the paper's 9 anchors.*3 scales x 2 = 6"):
        cnnlab.create_model("yolov3", num_classes=3, size=64, anchors="coco", anchors_per_scale=2)
    fractions = cnnlab.create_model("yolov3", num_classes=3, size=64, neck_channels=16,
                                    anchors=[[0.02 * i, 0.03 * i] for i in range(1, 10)])  # relative, not pixels
    with pytest.raises(CnnlabError) as info:
        fractions.fit_to_data(_train_boxes())
    message = str(info.value)
    assert "model.options.anchors" in message and "200 boxes" in message and "width min/median/max" in message
    assert "best IoU reached" in message
    with pytest.raises(CnnlabError, match="box_loss"):
        cnnlab.create_model("yolov3", num_classes=3, size=64, box_loss="l1")


def test_reset_classifier_changes_the_class_count(v1, v3):
    v3.reset_classifier(5)
    assert v3.head.predict[0].out_channels == 3 * (5 + 4) and v3.num_classes == 5
    v1.reset_classifier(6)
    assert v1.head.predict.out_features == 4 * 4 * (10 + 5)


def test_registered():
    detection = cnnlab.list_models(task="detection")
    assert {"yolov1", "yolov3"} <= set(detection)
    assert cnnlab.model_info("yolov1").default_input == (3, 448, 448)
    assert cnnlab.model_info("yolov3").family.url == "https://arxiv.org/abs/1804.02767"
