"""RetinaNet: the oracle (torchvision's retinanet_resnet50_fpn with its state_dict through cnnlab.load_weights),
the generic builder on other classifiers, options by torchvision's names, prior init, images without boxes,
reset_classifier, bad input, and one epoch through the shared engine.

The oracle runs at random init (no download) on small images (min_size 128, max_size 160); score_thresh=0 so that
the untrained model (every score near the prior 0.01) still outputs boxes, and topk_candidates /
detections_per_img small enough that both truncations are exercised.
"""
import re
from dataclasses import replace

import pytest
import torch
import torchvision
from torchvision.models.detection.retinanet import _default_anchorgen

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.detection.retinanet import OPTIONS, RetinaNet, from_torchvision, retinanet, retinanet_resnet50_fpn
from cnnlab.models.registry import create_model, model_info

TV_OPTIONS = dict(min_size=128, max_size=160, score_thresh=0.0, topk_candidates=300, detections_per_img=150)
TOL = 1e-4
SMALL = dict(min_size=64, max_size=96, fpn_channels=32)


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # several sizes, non-square both ways, in one batch (so padding is exercised too)
    return [torch.rand(3, 100, 140, generator=g), torch.rand(3, 128, 96, generator=g), torch.rand(3, 90, 90, generator=g)]


def _empty():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 5.0, 120.0, 70.0]]), "labels": torch.tensor([3, 4])},
        _empty(),  # an image without boxes
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 50.0], [60.0, 60.0, 64.0, 66.0]]), "labels": torch.tensor([1, 2])},
    ]  # the 4 x 6 box overlaps no anchor by 0.4: a low-quality match


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                                 **TV_OPTIONS)
    ours = retinanet_resnet50_fpn(num_classes=5, **TV_OPTIONS)
    result = cnnlab.load_weights(ours, theirs.state_dict())
    assert result.layout == "torchvision" and result.ok
    return theirs, ours


def _sorted(det):
    keys = det["scores"].double() * 1e6 + det["labels"].double() * 1e-3  # by score, ties by label
    order = torch.argsort(keys, descending=True, stable=True)
    return {k: v[order] for k, v in det.items()}


def _assert_same(expected, got, images):
    for i, (e, g) in enumerate(zip(expected, got)):
        assert len(e["boxes"]) > 0, "the oracle should detect something with score_thresh=0"
        assert g["boxes"].shape == e["boxes"].shape, f"image {i}"
        e, g = _sorted(e), _sorted(g)
        assert torch.equal(g["labels"], e["labels"]) and g["labels"].dtype == torch.int64
        assert (g["boxes"] - e["boxes"]).abs().max() <= TOL
        assert (g["scores"] - e["scores"]).abs().max() <= TOL
        h, w = images[i].shape[-2:]  # at the input image's size
        assert g["boxes"][:, 2].max() <= w + TOL and g["boxes"][:, 3].max() <= h + TOL


def test_eval_gives_torchvisions_detections(pair):
    theirs, ours = pair
    theirs.eval(), ours.eval()
    images = _images()
    default = ours.postprocess.config
    ours.postprocess.config = replace(default, background_detections=True)  # torchvision's output exactly
    try:
        with torch.no_grad():
            expected, got = theirs(images), ours(images)
    finally:
        ours.postprocess.config = default
    _assert_same(expected, got, images)
    assert all(len(e["boxes"]) == TV_OPTIONS["detections_per_img"] for e in expected)  # truncated, as intended
    assert any((e["labels"] == 0).any() for e in expected)  # torchvision scores the background channel too


def test_eval_default_never_reports_the_background(pair):
    # with the background channel's bias at -1000 (sigmoid exactly 0, under any score_thresh) torchvision cannot
    # report class 0 either; cnnlab's default, which skips that channel, must then give the same detections
    theirs, ours = pair
    theirs.eval(), ours.eval()
    bias = theirs.head.classification_head.cls_logits.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.view(9, 5)[:, 0] = -1000.0  # (A * K,): anchor-major, class channel 0 of each anchor
        ours.load_state_dict(from_torchvision(theirs.state_dict()))
        images = _images(4)[:2]
        try:
            expected, got = theirs(images), ours(images)
        finally:
            bias.copy_(saved)
            ours.load_state_dict(from_torchvision(theirs.state_dict()))
    _assert_same(expected, got, images)
    assert all((g["labels"] >= 1).all() for g in got)


def test_train_gives_torchvisions_losses(pair):
    theirs, ours = pair
    theirs.train(), ours.train()
    images = _images(2)
    torch.manual_seed(5)  # the transform draws its training size per image from torch's RNG, as torchvision's
    expected = theirs(images, _targets())
    torch.manual_seed(5)
    got = ours(images, _targets())
    assert set(got) == set(expected) == {"classification", "bbox_regression"}
    for k in expected:
        assert got[k].item() == pytest.approx(expected[k].item(), rel=1e-5, abs=1e-6), k
    # and the same gradients for the heads (autograd.grad stops there: the backbone is not back-propagated)
    names = [n for n, _ in theirs.head.named_parameters()]
    their_grads = torch.autograd.grad(sum(expected.values()), list(theirs.head.parameters()))
    our_grads = dict(zip([n for n, _ in ours.head.named_parameters()],
                         torch.autograd.grad(sum(got.values()), list(ours.head.parameters()))))
    converted = from_torchvision({f"head.{n}": g for n, g in zip(names, their_grads)})
    assert len(converted) == len(our_grads) == 20
    for name, grad in converted.items():
        torch.testing.assert_close(our_grads[name[len("head."):]], grad, rtol=1e-4, atol=1e-6)


def test_torchvision_layout_details(pair):
    theirs, _ = pair
    state = theirs.state_dict()
    # the v1 checkpoints (torchvision's COCO weights) number the subnets' convs 0, 2, 4, 6 in one Sequential
    v1 = {re.sub(r"_head\.conv\.(\d)\.0\.", lambda m: f"_head.conv.{2 * int(m.group(1))}.", k): v
          for k, v in state.items()}
    assert "head.classification_head.conv.6.weight" in v1
    assert from_torchvision(v1).keys() == from_torchvision(state).keys()
    ours = retinanet_resnet50_fpn(num_classes=5)
    assert cnnlab.load_weights(ours, v1).ok
    torch.testing.assert_close(ours.head.regression_head.conv[3].conv.weight, theirs.head.regression_head.conv[3][0].weight)
    assert ours.anchor_generator.sizes == tuple(tuple(map(float, s)) for s in _default_anchorgen().sizes)
    assert ours.backbone.names == ["0", "1", "2", "p6", "p7"] and ours.backbone.strides == [8, 16, 32, 64, 128]
    with pytest.raises(KeyError, match="not a key of torchvision's retinanet_resnet50_fpn"):
        from_torchvision({**state, "head.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "simple_cnn_bn"])
def test_any_classifier_as_backbone(backbone):
    model = retinanet(backbone=backbone, num_classes=3, score_thresh=0.0, **SMALL)
    assert model.backbone.names[-2:] == ["p6", "p7"]
    images = _images()[:2]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])}, _empty()]
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for det, image in zip(dets, images):
        assert set(det) == {"boxes", "labels", "scores"} and 0 < len(det["boxes"]) <= 300  # detections_per_img
        assert det["labels"].dtype == torch.int64 and 1 <= det["labels"].min() and det["labels"].max() <= 2
        h, w = image.shape[-2:]
        assert det["boxes"][:, 2].max() <= w + 1e-3 and det["boxes"][:, 3].max() <= h + 1e-3
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_generic_stages_anchors_and_extra_block():
    model = retinanet(backbone="resnet18", num_classes=3, **SMALL)
    assert [s.module for s in model.backbone.stages] == ["layer2", "layer3", "layer4"]  # C3-C5
    assert model.backbone.strides == [8, 16, 32, 64, 128]
    assert model.anchor_generator.sizes[0] == (32.0, 40.0, 50.0) and model.anchor_generator.sizes[4] == (512.0, 645.0, 812.0)
    assert model.head.classification_head.num_anchors == 9
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 32  # from P5, as torchvision's v1
    c5 = retinanet(backbone="resnet18", num_classes=3, extra_block="p6p7_c5", **SMALL)
    assert c5.backbone.fpn.extra_blocks.p6.in_channels == 512 and not c5.backbone.fpn.extra_blocks.use_P5
    few = retinanet(backbone="simple_cnn_bn", num_classes=3, anchor_sizes=(16, 32, 64), aspect_ratios=(1.0,),
                    anchor_scales=(1.0, 2.0), **SMALL)  # one stage (stride 8) + P6, P7: 3 maps
    assert few.anchor_generator.sizes[0] == (16.0, 32.0) and few.head.classification_head.num_anchors == 2
    assert few.head.classification_head.cls_logits.out_channels == 2 * 3
    given = retinanet(backbone="simple_cnn_bn", num_classes=3, anchor_sizes=((20, 30),) * 3, **SMALL)  # tuples: as given
    assert given.anchor_generator.sizes[2] == (20.0, 30.0)


def test_registered_and_options_by_torchvision_names():
    assert {"retinanet", "retinanet_resnet50_fpn"} <= set(cnnlab.list_models(task="detection"))
    assert model_info("retinanet_resnet50_fpn").family.paper.startswith("Lin et al.")
    model = create_model("retinanet", backbone="simple_cnn_bn", num_classes=4, min_size=72, max_size=100,
                         image_mean=[0.5] * 3, image_std=[0.2] * 3, score_thresh=0.1, nms_thresh=0.3,
                         detections_per_img=9, fg_iou_thresh=0.6, bg_iou_thresh=0.3, topk_candidates=50,
                         focal_gamma=1.0, focal_alpha=0.5, fpn_channels=32)
    assert isinstance(model, RetinaNet) and model.model_name == "retinanet" and model.num_classes == 4
    assert model.transform.min_size == (72,) and model.transform.max_size == 100
    assert model.transform.image_mean == [0.5] * 3 and model.transform.image_std == [0.2] * 3
    post = model.postprocess.config
    assert (post.score_thresh, post.nms_thresh, post.detections_per_img, post.topk_candidates) == (0.1, 0.3, 9, 50)
    matcher = model.loss.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.6, 0.3, True)
    assert (model.loss.alpha, model.loss.gamma) == (0.5, 1.0)
    assert {"min_size", "max_size", "image_mean", "image_std", "score_thresh", "nms_thresh", "detections_per_img",
            "fg_iou_thresh", "bg_iou_thresh", "topk_candidates"} <= set(OPTIONS)
    with torch.device("meta"):  # torchvision's documented num_params: the COCO model, frozen norms (no BN parameters)
        model = retinanet_resnet50_fpn(norm_layer="frozen_batchnorm")
    assert sum(p.numel() for p in model.parameters()) == 34_014_999


def test_prior_probability_init_and_reset_classifier():
    model = retinanet(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    cls = model.head.classification_head
    torch.testing.assert_close(torch.sigmoid(cls.cls_logits.bias), torch.full((27,), 0.01))
    assert model.head_name == "head.classification_head.cls_logits"
    assert model.get_submodule(model.head_name) is cls.cls_logits
    model.reset_classifier(6)
    assert cls.cls_logits.out_channels == 9 * 6 and model.num_classes == 6 and cls.num_classes == 6
    torch.testing.assert_close(torch.sigmoid(cls.cls_logits.bias), torch.full((54,), 0.01))
    model.eval()
    with torch.no_grad():
        det = model(_images()[:1])[0]
    assert det["labels"].numel() == 0  # every score is near the prior 0.01, under score_thresh 0.05
    model.train()
    losses = model(_images()[:1], [{"boxes": torch.tensor([[5.0, 5.0, 60.0, 60.0]]), "labels": torch.tensor([5])}])
    assert torch.isfinite(losses["classification"])
    other = retinanet(backbone="simple_cnn_bn", num_classes=6, **SMALL)  # another class count: all but the head loads
    result = cnnlab.load_weights(other, retinanet(backbone="simple_cnn_bn", num_classes=3, **SMALL).state_dict(),
                                 strict=False)
    assert [m.split(":")[0] for m in result.mismatched] == [f"{model.head_name}.bias", f"{model.head_name}.weight"]


def test_images_without_boxes_train():
    torch.manual_seed(0)
    model = retinanet(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    losses = model(_images()[:2], [_empty(), _empty()])
    assert losses["bbox_regression"].item() == 0.0
    assert 0 < losses["classification"].item() < 1  # every anchor a negative near the prior: small, not NaN
    sum(losses.values()).backward()
    grad = model.head.classification_head.cls_logits.bias.grad
    assert torch.isfinite(grad).all() and (grad > 0).all()  # pushed towards background


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = retinanet(backbone="simple_cnn_bn", num_classes=3, min_size=48, max_size=48, fpn_channels=32)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 0.2 for _ in range(2)]
    images[0][:, 10:34, 8:32] = 0.9
    images[1][:, 30:42, 20:56] = 0.9
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 32.0, 34.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 30.0, 56.0, 42.0]]), "labels": torch.tensor([2])}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


@pytest.mark.parametrize("options, message", [
    ({"num_classes": 1}, "num_classes counts the background"),
    ({"score_tresh": 0.1}, "did you mean score_thresh"),
    ({"anchor_sizes": (32, 64)}, "one base size .* per feature map; the backbone gives 5 maps"),
    ({"aspect_ratios": ((0.5, 1.0),) * 4 + ((1.0,),)}, "anchors per position"),
    ({"focal_gamma": -1.0}, "gamma must be a number >= 0"),
    ({"fg_iou_thresh": 0.3}, "bg_iou_thresh <= fg_iou_thresh"),
    ({"topk_candidates": 0}, "topk_candidates must be an int >= 1"),
    ({"prior_probability": 0.0}, r"prior_probability .* in \(0, 1\)"),
    ({"extra_block": "p8"}, "extra_block must be one of pool, p6p7, p6p7_c5"),
    ({"anchor_scales": ()}, "anchor_scales must be a non-empty tuple"),
])
def test_bad_options(options, message):
    with pytest.raises(CnnlabError, match=message):
        retinanet(backbone="simple_cnn_bn" if "anchor_sizes" not in options and "aspect_ratios" not in options
                  else "resnet18", **{"num_classes": 3, **SMALL, **options})


def test_bad_input():
    model = retinanet(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    with pytest.raises(CnnlabError, match="needs targets"):
        model(_images()[:1])
    with pytest.raises(CnnlabError, match=r"targets\[0\]\['labels'\] holds 3; expected 1..2"):
        model(_images()[:1], [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([3])}])
    with pytest.raises(CnnlabError, match="no positive width and height"):
        model(_images()[:1], [{"boxes": torch.tensor([[9.0, 1.0, 1.0, 9.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(CnnlabError, match="non-empty list"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(CnnlabError, match="counts the background"):
        model.reset_classifier(1)


def test_one_epoch_through_the_engine(tmp_path):
    from tests.engine.test_detection_task import det_config, make_bundle

    from cnnlab.engine import train
    from cnnlab.engine.config import ModelConfig

    config = det_config(tmp_path, "retina", epochs=1)
    config = replace(config, model=ModelConfig(name="retinanet", options={
        "backbone": "simple_cnn_bn", "min_size": 64, "max_size": 80, "fpn_channels": 32}))
    result = train(config, data=make_bundle(n_train=8, n_val=4, n_test=4))
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss_classification", "train_loss_bbox_regression", "val_loss", "val_AP", "val_AP50"} <= set(header)
