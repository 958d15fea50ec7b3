"""Oracle: cnnlab's fasterrcnn_resnet50_fpn against torchvision's, with torchvision's weights loaded through
cnnlab.load_weights. Random init (no download), small images (min_size 128, max_size 160) to stay fast.

Sampling: both libraries draw from torch's global RNG in the same order (the transform's size choice per
image, then per image one randperm over the positives and one over the negatives, RPN then RoI heads), so
seeding torch identically before each model's forward makes the sampled anchors and RoIs the same.
"""
import pytest
import torch
import torchvision
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

import cnnlab
from cnnlab.detection.faster_rcnn import fasterrcnn_resnet50_fpn, from_torchvision

SIZES = dict(min_size=128, max_size=160)
TOL = 1e-4


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # several sizes, non-square both ways, in one batch (so padding is exercised too)
    return [torch.rand(3, 100, 140, generator=g), torch.rand(3, 128, 96, generator=g), torch.rand(3, 90, 90, generator=g)]


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 5.0, 120.0, 70.0]]), "labels": torch.tensor([3, 7])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without boxes
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 50.0]]), "labels": torch.tensor([1])},
    ]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, **SIZES)
    ours = fasterrcnn_resnet50_fpn(box_score_thresh=0.0, **SIZES)
    result = cnnlab.load_weights(ours, theirs.state_dict())
    assert result.layout == "torchvision" and result.ok
    return theirs, ours


def _sorted(det):
    # order by score, ties broken by label and box, so that equal outputs compare equal
    keys = det["scores"].double() * 1e6 + det["labels"].double() * 1e-3
    order = torch.argsort(keys, descending=True, stable=True)
    return {k: v[order] for k, v in det.items()}


def test_eval_gives_the_same_detections(pair):
    theirs, ours = pair
    theirs.eval(), ours.eval()
    images = _images()
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert len(e["boxes"]) > 0, "the oracle should detect something with box_score_thresh=0"
        assert g["boxes"].shape == e["boxes"].shape, f"image {i}"
        e, g = _sorted(e), _sorted(g)
        assert torch.equal(g["labels"], e["labels"]) and g["labels"].dtype == torch.int64
        assert (g["boxes"] - e["boxes"]).abs().max() <= TOL
        assert (g["scores"] - e["scores"]).abs().max() <= TOL
        h, w = images[i].shape[-2:]  # at the input image's size
        assert g["boxes"][:, 2].max() <= w + TOL and g["boxes"][:, 3].max() <= h + TOL


def test_train_gives_the_same_losses(pair):
    theirs, ours = pair
    theirs.train(), ours.train()
    images = _images(2)
    for seed in (5, 6):
        with torch.no_grad():  # the losses' values are what is compared; no graph needed
            torch.manual_seed(seed)
            expected = theirs(images, _targets())
            torch.manual_seed(seed)
            got = ours(images, _targets())
        assert set(got) == set(expected) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        for k in expected:
            assert float(got[k]) == pytest.approx(float(expected[k]), abs=TOL), k


def test_frozen_batchnorm_and_trainable_layers_as_torchvision():
    # torchvision's pretrained configuration, built by hand without a download: FrozenBatchNorm2d, 3 trainable stages
    torch.manual_seed(0)
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    theirs = tv_frcnn.FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=5, box_score_thresh=0.0, **SIZES)
    ours = fasterrcnn_resnet50_fpn(num_classes=5, norm_layer="frozen_batchnorm", trainable_backbone_layers=3,
                                   box_score_thresh=0.0, **SIZES)
    assert cnnlab.load_weights(ours, theirs.state_dict()).ok
    # a frozen-norm checkpoint (as torchvision's COCO one) also fits the default, trainable-norm model:
    # the BatchNorm2d counters it lacks are filled in
    assert cnnlab.load_weights(fasterrcnn_resnet50_fpn(num_classes=5, **SIZES), theirs.state_dict()).ok
    # the same parameters train: map torchvision's names through the converter
    their_grad = from_torchvision({n: torch.tensor(p.requires_grad) for n, p in theirs.named_parameters()})
    our_grad = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert {n: bool(v) for n, v in their_grad.items()} == our_grad
    assert not our_grad["backbone.body.layer1.0.residual.conv1.conv.weight"]
    assert our_grad["backbone.body.layer2.0.residual.conv1.conv.weight"]

    theirs.train(), ours.train()
    images, targets = _images(3)[:2], _targets()[:2]
    for t in targets:
        t["labels"] = t["labels"].clamp(max=4)
    with torch.no_grad():
        torch.manual_seed(11)
        expected = theirs(images, targets)
        torch.manual_seed(11)
        got = ours(images, targets)
    for k in expected:
        assert float(got[k]) == pytest.approx(float(expected[k]), abs=TOL), k
