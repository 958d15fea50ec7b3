"""SSD: cnnlab's ssd300_vgg16 against torchvision's with the same weights (detections and losses), its parts
against torchvision's (default boxes, matcher, MultiBox loss with hard negatives), and the generic ``ssd`` on
registered classifiers (training, images without boxes, bad options, the engine's detection step)."""
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.ssd import SSD as TVSSD

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.detection._ssd_boxes import DefaultBoxGenerator, MultiBoxLoss, SSDMatcher
from cnnlab.detection.boxes import BoxCoder
from cnnlab.detection.ssd import SSD300_STEPS, ssd, ssd300_vgg16
from cnnlab.detection.transform import ImageList

TOL = 1e-4
K = 3  # classes with the background


def _empty():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # landscape and portrait: every image is resized to the model's fixed size and its boxes mapped back
    return [torch.rand(3, 200, 320, generator=g), torch.rand(3, 260, 150, generator=g)]


def _targets():
    return [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 150.0], [50.0, 60.0, 290.0, 180.0]]),
             "labels": torch.tensor([1, 2])},
            _empty()]  # an image without boxes


def _same_detections(theirs, ours):
    for t, o in zip(theirs, ours):
        assert t["boxes"].shape[0] > 0  # random weights still score above torchvision's 0.01
        assert t["boxes"].shape == o["boxes"].shape
        # both keep the same boxes in the same order (NMS and top-k on the same scores)
        assert torch.equal(t["labels"], o["labels"])
        assert (t["boxes"] - o["boxes"]).abs().max() <= TOL
        assert (t["scores"] - o["scores"]).abs().max() <= TOL


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=K)
    ours = ssd300_vgg16(num_classes=K)
    result = cnnlab.load_weights(ours, theirs.state_dict())
    assert result.layout == "torchvision" and result.ok
    return theirs, ours


# -- the oracle: torchvision's ssd300_vgg16 ------------------------------------------------------------------------
def test_oracle_detections_and_losses(pair):
    theirs, ours = pair
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    images = _images()
    theirs.eval(), ours.eval()
    with torch.no_grad():
        _same_detections(theirs(images), ours(images))
    theirs.train(), ours.train()
    # hard negative mining is a sort of the losses: deterministic, no RNG
    with torch.no_grad():
        their_losses, our_losses = theirs(images, _targets()), ours(images, _targets())
    assert set(our_losses) == set(their_losses) == {"bbox_regression", "classification"}
    for name, value in their_losses.items():
        assert torch.isclose(our_losses[name], value, rtol=1e-5, atol=TOL), name


def test_oracle_non_square_size(pair):
    """``size`` is (width, height) as torchvision's; 300 x 272 keeps every SSD300 map at least 1 x 1."""
    theirs, _ = pair
    ours = ssd300_vgg16(num_classes=K, size=(300, 272), steps=SSD300_STEPS)
    cnnlab.load_weights(ours, theirs.state_dict())
    theirs.transform.fixed_size, theirs.transform.min_size = (300, 272), (272,)
    try:
        theirs.eval(), ours.eval()
        image = [_images()[0]]
        with torch.no_grad():
            _same_detections(theirs(image), ours(image))
    finally:
        theirs.transform.fixed_size, theirs.transform.min_size = (300, 300), (300,)


def test_trainable_backbone_layers_freeze_vgg_stages():
    model = ssd300_vgg16(num_classes=K, trainable_backbone_layers=2)
    frozen = {n.split(".")[2] for n, p in model.backbone.stages.named_parameters(prefix="backbone.stages")
              if not p.requires_grad}
    assert frozen == {"0", "1", "2"}  # conv1 .. conv3; conv4, conv5, fc6, fc7 and the extras train
    assert all(p.requires_grad for p in model.backbone.fc6.parameters())


# -- the parts against torchvision's -----------------------------------------------------------------------------
@pytest.mark.parametrize("steps, batch_size", [((8, 16, 32, 64, 100, 300), (300, 300)), (None, (160, 224))])
def test_default_boxes_equal_torchvisions(steps, batch_size):
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
    theirs = TVDefaultBoxGenerator(ratios, scales=scales, steps=steps)
    ours = DefaultBoxGenerator(ratios, scales, steps)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    tensors = torch.zeros(2, 3, *batch_size)
    maps = [torch.zeros(2, 1, s, s + 1) for s in (20, 10, 5, 3, 2, 1)]
    expected = theirs(TVImageList(tensors, [batch_size] * 2), maps)
    found = ours(ImageList(tensors, [batch_size] * 2), maps)
    assert len(found) == 2 and torch.allclose(found[0], expected[0], atol=1e-5)


def test_matcher_forces_each_boxes_best_default_box():
    g = torch.Generator().manual_seed(0)
    iou = torch.rand(4, 50, generator=g) * 0.6  # most below 0.5: the forced matches matter
    expected = tv_utils.SSDMatcher(0.5)(iou)
    found = SSDMatcher(0.5)(iou)
    assert torch.equal(found, expected)
    assert set(found[iou.argmax(dim=1)].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("num_boxes", [0, 3, 30])  # 30 boxes on 64 default boxes: fewer than 3 negatives each
def test_multibox_loss_equals_torchvisions(num_boxes):
    g = torch.Generator().manual_seed(num_boxes)
    defaults = torch.rand(64, 2, generator=g) * 80
    defaults = torch.cat([defaults, defaults + 5 + torch.rand(64, 2, generator=g) * 40], dim=1)
    gt = defaults[torch.randperm(64, generator=g)[:num_boxes]] + torch.rand(num_boxes, 4, generator=g)
    targets = [{"boxes": gt, "labels": torch.randint(1, 5, (num_boxes,), generator=g)}, _empty()]
    logits, regression = torch.randn(2, 64, 5, generator=g), torch.randn(2, 64, 4, generator=g)
    loss = MultiBoxLoss(BoxCoder((10.0, 10.0, 5.0, 5.0)), 0.5, 0.25)
    found = loss(targets, logits, regression, [defaults, defaults])
    # torchvision's SSD.compute_loss, on the same matches (its matcher is checked above)
    fake_self = SimpleNamespace(box_coder=tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3.0)
    matched = loss.match(targets, [defaults, defaults])
    expected = TVSSD.compute_loss(fake_self, targets, {"bbox_regression": regression, "cls_logits": logits},
                                  [defaults, defaults], matched)
    for name in ("bbox_regression", "classification"):
        assert torch.isclose(found[name], expected[name], rtol=1e-5, atol=1e-6), name
    if num_boxes == 0:  # no positives: 0, not NaN (and no negatives are mined, as torchvision)
        assert found["bbox_regression"] == 0 and found["classification"] == 0


def test_hard_negatives_are_the_highest_losses():
    loss = MultiBoxLoss(BoxCoder(), 0.5, 0.25)
    cls_loss = torch.tensor([[0.1, 5.0, 0.3, 0.9, 0.2, 0.8, 0.05, 0.7, 0.6]])
    positive = torch.zeros_like(cls_loss, dtype=torch.bool)
    positive[0, 1] = True  # 1 positive: the 3 largest other losses are mined
    assert loss.hard_negatives(cls_loss, positive)[0].nonzero().flatten().tolist() == [3, 5, 7]


# -- the generic SSD on any classifier ---------------------------------------------------------------------------
def _small_scene():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 96, 160, generator=g)]
    return images, [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([2])}, _empty()]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return cnnlab.create_model("ssd", backbone="resnet18", num_classes=K, size=128)


def test_generic_maps_train_and_detect(small):
    model = small
    assert model.backbone.out_channels == [128, 256, 512, 512, 256, 256]  # layer2-4, then 3 extra blocks
    assert model.backbone.strides == [8, 16, 32, 64, 128, 256]
    images, targets = _small_scene()
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    model.zero_grad()
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    # an image without boxes alone: no positives, both terms exactly 0 (not NaN), and it still backpropagates
    empty = model([images[1]], [targets[1]])
    assert empty["bbox_regression"] == 0 and empty["classification"] == 0
    sum(empty.values()).backward()
    model.eval()
    with torch.no_grad():
        found = model(images)
    for image, det in zip(images, found):
        h, w = image.shape[-2:]
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] <= 200
        assert (det["boxes"][:, 2] <= w + 1e-4).all() and (det["boxes"][:, 3] <= h + 1e-4).all()
        assert ((det["labels"] >= 1) & (det["labels"] < K)).all()


def test_generic_default_box_options_and_other_backbone():
    model = ssd(backbone="simple_cnn_bn", num_classes=K, size=(96, 64), num_maps=4, min_scale=0.1, max_scale=0.6,
                aspect_ratios=[[2], [2, 3], [2], [2]])
    assert model.backbone.strides == [8, 16, 32, 64]  # its one stage of stride 8, then 3 extra blocks
    assert model.default_boxes.scales == pytest.approx((0.1, 0.1 + 0.5 / 3, 0.1 + 1 / 3, 0.6, 1.0))
    assert model.head.num_anchors == [4, 6, 4, 4]
    model.eval()
    with torch.no_grad():
        assert model([torch.rand(3, 50, 70)])[0]["boxes"].shape[1] == 4


def test_pyramid_maps_see_the_deepest_stage():
    torch.manual_seed(0)
    model = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4, fpn_channels=64)
    assert model.backbone.out_channels == [64, 64, 64, 64]  # FPN on layer2-4, then one extra block of its width
    assert model.backbone.strides == [8, 16, 32, 64]
    maps = model.backbone(torch.rand(1, 3, 128, 128))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    # the first (stride-8) map depends on layer4 through the top-down path; without the pyramid it cannot
    maps["0"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.backbone.body.layer4.parameters())
    plain = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4)
    plain.backbone(torch.rand(1, 3, 128, 128))["0"].sum().backward()
    assert all(p.grad is None for p in plain.backbone.body.layer4.parameters())
    images, targets = _small_scene()
    model.zero_grad()
    losses = model(images, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert model(images)[0]["boxes"].shape[1] == 4


def test_concat_deeper_maps_carry_the_deeper_stages_resized():
    import torch.nn.functional as F

    from cnnlab.detection.backbone import run_tapped

    torch.manual_seed(0)
    model = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4, concat_deeper=True).eval()
    assert model.backbone.out_channels == [128 + 256 + 512, 256 + 512, 512, 512]  # layer2-4, one extra block
    assert model.head.cls_logits[0].in_channels == 896
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        maps = model.backbone(x)
        taps = run_tapped(model.backbone.body, x, ["layer2", "layer3", "layer4"])
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    layer2, layer3, layer4 = taps["layer2"], taps["layer3"], taps["layer4"]
    up = lambda t, n: F.interpolate(t, size=(n, n), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(maps["0"], torch.cat([layer2, up(layer3, 16), up(layer4, 16)], 1), rtol=0, atol=0)
    torch.testing.assert_close(maps["1"], torch.cat([layer3, up(layer4, 8)], 1), rtol=0, atol=0)
    torch.testing.assert_close(maps["2"], layer4, rtol=0, atol=0)
    # the extra block grows from layer4's own map, as without the fusion
    torch.testing.assert_close(maps["3"], model.backbone.extras[0](layer4), rtol=0, atol=0)
    model.train()
    images, targets = _small_scene()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_head_blocks_start_as_the_identity_and_train():
    torch.manual_seed(0)
    plain = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4)
    model = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4, head_blocks=[2, 1])
    assert list(model.head.blocks) == ["0", "1"] and len(model.head.blocks["0"]) == 2
    assert "blocks" not in "".join(plain.state_dict())  # the paper's head: no new keys (torchvision's layout)
    # a new block's second conv is zero: the head sees the backbone's maps as they are
    maps = [torch.rand(1, c, s, s) for c, s in zip(model.backbone.out_channels, (16, 8, 4, 2))]
    assert all(torch.equal(model.head.blocks[k](maps[int(k)]), maps[int(k)]) for k in model.head.blocks)
    images, targets = _small_scene()
    losses = model(images, targets)
    sum(losses.values()).backward()
    block = model.head.blocks["0"][0]
    assert block.conv2.weight.grad.abs().sum() > 0  # the zero conv learns first ...
    with torch.no_grad():  # once the second conv is no longer zero (as after a step) ...
        block.conv2.weight.normal_(0.0, 0.01)
    model.zero_grad()
    sum(model(images, targets).values()).backward()
    assert block.conv1.weight.grad.abs().sum() > 0  # ... the first one learns too
    every = ssd(backbone="resnet18", num_classes=K, size=128, num_maps=4, head_blocks=1)
    assert list(every.head.blocks) == ["0", "1", "2", "3"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a 1 x 1 map runs in fp32 (see the extra blocks' test)
        assert every.head.blocks["3"](torch.rand(1, 512, 1, 1)).dtype == torch.float32


def test_extra_blocks_on_1x1_maps_keep_bf16_gradients_finite():
    # torch's CPU bf16 conv gives NaN weight gradients now and then for a 3x3 stride-2 conv on a 1x1 input
    # (5-14 of 40 trials when measured); the extra blocks run such maps in fp32, so none of 40 may be NaN
    from cnnlab.detection._ssd_backbones import ExtraBlock, extra_layers

    torch.manual_seed(0)
    for _ in range(40):
        layer = extra_layers(128, [ExtraBlock(128, 256)])[0]
        x = torch.randn(1, 128, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (1, 256, 1, 1)
        (y * torch.randn_like(y)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # larger maps keep autocast's bf16
        assert layer(torch.randn(1, 128, 4, 4)).dtype == torch.bfloat16


def test_reset_classifier_and_weights_round_trip(small, tmp_path):
    model = cnnlab.create_model("ssd", backbone="resnet18", num_classes=K, size=128)
    result = cnnlab.load_weights(model, small.state_dict())
    assert result.layout == "cnnlab" and result.ok
    model.reset_classifier(6)
    assert model.head.cls_logits[0].out_channels == 6 * 4 and model.num_classes == 6
    assert model.head_name == "head.cls_logits"
    # backbone weights from a file (a classifier's state_dict): loaded, batch norms frozen
    torch.save(cnnlab.create_model("resnet18", num_classes=5).state_dict(), tmp_path / "r18.pt")
    weighted = ssd(backbone="resnet18", num_classes=K, size=128, backbone_weights=tmp_path / "r18.pt")
    source = torch.load(tmp_path / "r18.pt")
    assert torch.equal(weighted.backbone.body.stem.conv.weight, source["stem.conv.weight"])
    assert type(weighted.backbone.body.stem.norm).__name__ == "FrozenBatchNorm2d"


def test_engine_detection_step(small):
    from cnnlab.engine.tasks.detection import DetectionTask, _loss_mode

    model = small
    model.train()
    images, targets = _small_scene()
    task = DetectionTask()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.head.cls_logits[0].weight.detach().clone()
    out = task.step(model, (images, targets), None)
    assert set(out.output) == {"loss_bbox_regression", "loss_classification"} and out.count == 2
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.head.cls_logits[0].weight)
    # the validation loss pass: the detector's own modules in training mode, every layer in eval
    _loss_mode(model)
    with torch.no_grad():
        losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    assert not model.backbone.body.stem.norm.training


@pytest.mark.parametrize("options, words", [
    ({"aspect_ratios": [[2], [2, 3]]}, "aspect_ratios"),
    ({"scales": (0.1, 0.2, 1.5, 0.6, 0.7, 0.8, 1.0)}, "(0, 1]"),
    ({"scales": (0.1, 0.2)}, "7"),
    ({"min_scale": 0.0}, "min_scale"),
    ({"max_scale": 1.2}, "max_scale"),
    ({"size": 0}, "size"),
    ({"size": (128, -5)}, "size"),
    ({"score_tresh": 0.1}, "score_thresh"),
    ({"positive_fraction": 0.0}, "positive_fraction"),
    ({"topk_candidates": 0}, "topk_candidates"),
    ({"returned_stages": [4, 2]}, "returned_stages"),
    ({"extra_channels": [256, 0]}, "extra_channels"),
    ({"fpn_channels": 0}, "fpn_channels"),
    ({"head_blocks": [1, -1]}, "head_blocks"),
    ({"head_blocks": [1] * 9}, "at most 6"),
    ({"head_blocks": "2"}, "head_blocks"),
    ({"concat_deeper": "yes"}, "concat_deeper"),
    ({"concat_deeper": True, "fpn_channels": 32}, "not with fpn_channels"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(CnnlabError) as info:
        ssd(backbone="simple_cnn_bn", num_classes=K, size=options.pop("size", 96), **options)
    assert words in str(info.value)


def test_registered():
    detection = cnnlab.list_models(task="detection")
    for name in ("ssd300_vgg16", "ssd"):
        assert name in detection
        info = cnnlab.model_info(name)
        assert info.default_input == (3, 300, 300) and info.family.url == "https://arxiv.org/abs/1512.02325"


def test_ssd300_vgg16_refuses_a_size_its_unpadded_extras_cannot_take():
    with pytest.raises(CnnlabError, match="268 px"):
        ssd300_vgg16(num_classes=K, size=(300, 200))
