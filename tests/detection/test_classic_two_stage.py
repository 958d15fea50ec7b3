"""R-CNN, SPP-net and Fast R-CNN: torchvision's detection interface, training, empty images, their pooling stages."""
import importlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

from cnnlab._errors import CnnlabError
from cnnlab.detection._region_models import RegionCNN, RegionHeads, RoIPool, WarpRegions, infer_scale
from cnnlab.detection.roi_heads import RoIHeads
from cnnlab.layers.spp import SPPRoIPool, spp_roi_pool
from cnnlab.models import create_model, list_models, model_info

MODELS = ["rcnn", "sppnet", "fast_rcnn"]
TINY = "fmnist_net"  # 141k parameters, BN, min input 8: a region CNN of 28 x 28 warps, a stride-8 conv map


def _build(name, num_classes=3, **options):
    options.setdefault("proposals", {"method": "grid", "max_proposals": 120, "grid_scales": (0.25, 0.4, 0.6)})
    if name != "rcnn":
        options.setdefault("representation_size", 64)
    return create_model(name, num_classes=num_classes, backbone=TINY, min_size=64, max_size=96, **options)


def _scene(seed=0):
    """Two small images with coloured rectangles (class 1 red, class 2 green) and one image without boxes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    layouts = [((64, 64), [((8, 10, 36, 40), 1), ((40, 30, 60, 58), 2)]), ((56, 72), [((30, 6, 66, 34), 2)]),
               ((64, 64), [])]
    for (h, w), objects in layouts:
        image = 0.2 * torch.rand(3, h, w, generator=g)
        for (x1, y1, x2, y2), label in objects:
            colour = torch.tensor([0.9, 0.1, 0.1] if label == 1 else [0.1, 0.9, 0.1])
            image[:, y1:y2, x1:x2] = colour[:, None, None]
        images.append(image)
        boxes = torch.tensor([box for box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        targets.append({"boxes": boxes, "labels": torch.tensor([lab for _, lab in objects], dtype=torch.int64)})
    return images, targets


def test_registered_as_detection_models():
    detection = list_models(task="detection")
    for name in MODELS:
        assert name in detection
        info = model_info(name)
        assert info.default_input[0] == 3 and info.family.url.startswith("https://arxiv.org/")


@pytest.mark.parametrize("name, options", [("rcnn", {}), ("rcnn", {"head": {"cls_loss": "hinge", "batch_size_per_image": 32}}),
                                           ("sppnet", {}), ("fast_rcnn", {}), ("fast_rcnn", {"roi_pool": "align"}),
                                           ("fast_rcnn", {"fpn": True, "fpn_channels": 32})])
def test_losses_finite_and_falling(name, options):
    torch.manual_seed(0)
    options.setdefault("head", {"batch_size_per_image": 32})  # 32 regions per image: small, still 25 % foreground
    model = _build(name, **options)
    images, targets = _scene()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    totals = []
    for _ in range(10):
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.6 * first, totals


@pytest.mark.parametrize("name", MODELS)
def test_eval_output_format_at_input_size(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    images = [torch.rand(3, 40, 50), torch.rand(3, 130, 90)]  # resized to 64 / 96 inside: boxes come back
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, list) and len(out) == 2
    for det, image in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,) and det["scores"].is_floating_point()
        assert n <= 100
        if n:
            h, w = image.shape[-2:]
            b = det["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w + 1e-4).all() and (b[:, 3] <= h + 1e-4).all()
            assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
            assert ((det["scores"] > 0.05) & (det["scores"] <= 1)).all()


@pytest.mark.parametrize("name", MODELS)
def test_images_without_boxes_train_and_evaluate(name):
    torch.manual_seed(0)
    model = _build(name)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model.train()(images, empty)
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    with torch.no_grad():
        out = model.eval()([torch.zeros(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4


def test_targets_are_checked():
    model = _build("fast_rcnn").train()
    images, targets = _scene()
    with pytest.raises(CnnlabError, match="needs targets"):
        model(images)
    bad = [dict(t) for t in targets]
    bad[0] = {"boxes": targets[0]["boxes"], "labels": torch.tensor([1, 3])}
    with pytest.raises(CnnlabError, match=r"targets\[0\]\['labels'\]"):
        model(images, bad)
    with pytest.raises(CnnlabError, match="num_classes counts the background"):
        _build("sppnet", num_classes=1)
    with pytest.raises(CnnlabError, match="fpn=True pools with RoIAlign"):
        _build("fast_rcnn", fpn=True, roi_pool="pool")


def test_fast_rcnn_on_a_feature_pyramid():
    from torchvision.ops import MultiScaleRoIAlign

    model = _build("fast_rcnn", fpn=True)
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1"]  # fmnist_net's stride-4 and stride-8 stages
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4


def test_rcnn_runs_the_cnn_once_per_region():
    """R-CNN's cost: every region goes through the CNN (in chunks of region_batch_size), no shared conv pass."""
    torch.manual_seed(0)
    model = _build("rcnn", region_batch_size=16).eval()
    assert isinstance(model.roi_heads.box_head, RegionCNN)
    calls = []
    model.roi_heads.box_head.cnn.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape))
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 37) + torch.arange(37.0)[:, None] / 4, torch.tensor([[4.0, 4.0, 30.0, 40.0]] * 5)]
    with torch.no_grad():
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 80)], proposals=proposals)
    assert len(calls) == math.ceil(42 / 16) and sum(shape[0] for shape in calls) == 42
    assert all(shape[1:] == (3, 28, 28) for shape in calls)  # warped to fmnist_net's 28 x 28 input

    # in training: one CNN pass per sampled region (the sampled regions plus nothing else)
    calls.clear()
    model.train()
    images, targets = _scene()
    model(images, targets)
    sampled = sum(shape[0] for shape in calls)
    # R-CNN's mini-batch: 128 regions per step over the whole batch (42 for each of the 3 images), not per image
    assert len(calls) == math.ceil(sampled / 16) and 0 < sampled <= 3 * (128 // 3)


def test_rcnn_samples_its_regions_per_batch_not_per_image():
    images, targets = _scene()
    counts = {}
    for per_batch in (30, None):  # None: torchvision's rule, batch_size_per_image (128) for each image
        torch.manual_seed(0)
        model = _build("rcnn", head={"regions_per_batch": per_batch}).train()
        calls = []
        model.roi_heads.box_head.cnn.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
        model(images, targets)
        counts[per_batch] = sum(calls)
    # 120 grid proposals (+ the ground truth) per image: 10 each of the 3 images, or all of them without a cap
    assert counts[30] == 30 and counts[None] > 3 * 120
    with pytest.raises(CnnlabError, match="regions_per_batch must be a positive int"):
        _build("rcnn", head={"regions_per_batch": 0})


def test_warp_regions_is_crop_and_resize_with_context():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 40)
    warp = WarpRegions((8, 8), context_padding=0.0)
    # a 16 x 16 box warped to 8 x 8: each output pixel is the mean of a 2 x 2 block (roi_align, 2 x 2 samples)
    out = warp({"image": image}, [torch.tensor([[4.0, 8.0, 20.0, 24.0]])], [(32, 40)])
    torch.testing.assert_close(out[0], F.avg_pool2d(image[0, :, 8:24, 4:20], 2))
    # context padding: the box grows about its centre so it fills 1 - 2p of the warp (p = 0.25: twice the size)
    padded = WarpRegions((8, 8), context_padding=0.25)
    torch.testing.assert_close(padded.dilate(torch.tensor([[10.0, 12.0, 18.0, 20.0]])), torch.tensor([[6.0, 8.0, 22.0, 24.0]]))
    torch.testing.assert_close(padded({"image": image}, [torch.tensor([[10.0, 12.0, 18.0, 20.0]])], [(32, 40)]),
                               warp({"image": image}, [torch.tensor([[6.0, 8.0, 22.0, 24.0]])], [(32, 40)]))
    assert abs(WarpRegions((227, 227)).dilate(torch.tensor([[0.0, 0.0, 195.0, 195.0]]))[0, 2] - (195 + 16 * 195 / 195)) < 1e-3


def test_conv_pass_models_pool_the_shared_map():
    """SPP-net pools a 1-2-3-6 pyramid, Fast R-CNN a 7 x 7 RoI pool, both from one stride-8 conv map."""
    torch.manual_seed(0)
    features = {"0": torch.randn(2, 16, 8, 10)}
    shapes = [(64, 80), (60, 72)]
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [8.0, 16.0, 70.0, 60.0]]), torch.tensor([[4.0, 4.0, 30.0, 50.0]])]
    assert infer_scale(features["0"], shapes) == 1 / 8
    torch.testing.assert_close(SPPRoIPool((1, 2, 3, 6))(features, boxes, shapes),
                               spp_roi_pool(features["0"], boxes, (1, 2, 3, 6), 1 / 8))
    torch.testing.assert_close(RoIPool(7)(features, boxes, shapes), roi_pool(features["0"], boxes, 7, 1 / 8))

    spp = _build("sppnet")
    assert isinstance(spp.roi_heads.box_roi_pool, SPPRoIPool) and spp.roi_heads.box_roi_pool.levels == (1, 2, 3, 6)
    assert spp.roi_heads.box_head.fc6.in_features == 128 * 50  # fmnist_net's stride-8 stage: 128 channels
    frozen = _build("sppnet", trainable_backbone_layers=0)  # the paper's SPP-net: only the layers above SPP train
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.roi_heads.parameters())
    fast = _build("fast_rcnn")
    assert isinstance(fast.roi_heads, RoIHeads) and isinstance(fast.roi_heads, RegionHeads)
    assert fast.roi_heads.box_head.fc6.in_features == 128 * 7 * 7
    # one conv pass per image batch, whatever the number of proposals
    calls = []
    fast.backbone.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast.eval()([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    assert len(calls) == 1


def test_backbone_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    classifier = create_model(TINY, in_channels=3, num_classes=10)
    path = tmp_path / "fmnist.pt"
    torch.save(classifier.state_dict(), path)
    rcnn = _build("rcnn", backbone_weights=str(path))
    torch.testing.assert_close(rcnn.roi_heads.box_head.cnn.stages[0][0].conv.weight, classifier.stages[0][0].conv.weight)
    fast = _build("fast_rcnn", backbone_weights=str(path))
    torch.testing.assert_close(fast.backbone.body.stages[0][0].conv.weight, classifier.stages[0][0].conv.weight)


def test_precomputed_proposals_and_the_cache():
    torch.manual_seed(0)
    model = _build("fast_rcnn").eval()
    images, _ = _scene()
    with torch.no_grad():
        a = model(images)
        assert model.proposer.misses == 3
        b = model(images, proposals=model.propose(images))
    assert model.proposer.misses == 3 and model.proposer.hits == 3  # the second pass reused the cached boxes
    for x, y in zip(a, b):
        torch.testing.assert_close(x["boxes"], y["boxes"])
        torch.testing.assert_close(x["scores"], y["scores"])


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None or not hasattr(importlib.import_module("cv2"), "ximgproc"),
                    reason="opencv-contrib-python-headless (cv2.ximgproc) not installed")
def test_selective_search_proposals_feed_the_model():
    """The papers' setting end to end: selective search on the input image, then detections at its size."""
    torch.manual_seed(0)
    model = _build("fast_rcnn", proposals={"method": "selective_search_fast", "max_proposals": 300}).eval()
    images, _ = _scene()
    with torch.no_grad():
        out = model(images[:2])
    assert [det["boxes"].shape[1] for det in out] == [4, 4]
    assert model.proposer.misses == 2 and all(1 <= len(b) <= 300 for b in model.proposer.cache.values())


@pytest.mark.parametrize("name", ["rcnn", "fast_rcnn"])
def test_boxes_come_back_at_the_input_size(name):
    """An image at twice the size (each pixel repeated 2 x 2) is resized to the same batch inside (the bilinear
    halving averages each 2 x 2 block back); given twice the proposals, the detections are exactly twice the boxes."""
    torch.manual_seed(0)
    model = _build(name).eval()
    images, _ = _scene()
    small = images[0]
    large = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    proposals = model.propose([small])[0]
    with torch.no_grad():
        a = model([small], proposals=[proposals])[0]
        b = model([large], proposals=[proposals * 2])[0]
    assert a["boxes"].shape[0] > 0
    torch.testing.assert_close(b["boxes"], a["boxes"] * 2, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-5, atol=1e-5)
    assert torch.equal(b["labels"], a["labels"])


@pytest.mark.parametrize("name", ["fast_rcnn", "sppnet"])
def test_roi_pool_models_run_under_bf16_autocast(name):
    """torchvision's CPU roi_pool has no bf16 kernel: the pooling runs in float32 under autocast."""
    model = create_model(name, backbone="simple_cnn_bn", num_classes=3, min_size=64, max_size=64,
                                proposals={"method": "grid", "max_proposals": 20}).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4 and torch.isfinite(out[0]["scores"].float()).all()
