"""Anchors, the RPN, the RoI heads and the transform, each against its torchvision counterpart on the same inputs."""
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import anchor_utils as tv_anchors
from torchvision.models.detection import roi_heads as tv_roi
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TvPredictor
from torchvision.models.detection.faster_rcnn import TwoMLPHead as TvTwoMLPHead
from torchvision.models.detection.image_list import ImageList as TvImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from cnnlab._errors import CnnlabError
from cnnlab.detection.anchors import AnchorGenerator
from cnnlab.detection.roi_heads import FastRCNNPredictor, RoIHeads, RoIPool, TwoMLPHead, fastrcnn_loss
from cnnlab.detection.rpn import RegionProposalNetwork, RPNHead
from cnnlab.detection.transform import DetectionTransform, ImageList

SIZES = ((16,), (32, 48))
RATIOS = ((0.5, 1.0, 2.0), (1.0,))


def _features(seed=0, channels=8):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("0", torch.randn(2, channels, 16, 20, generator=g)),
                        ("1", torch.randn(2, channels, 8, 10, generator=g))])


def _batch():
    return torch.zeros(2, 3, 64, 80), [(64, 80), (50, 70)]


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_anchors_match_torchvision():
    tensors, sizes = _batch()
    features = list(_features().values())
    # the same per-map anchor counts per position are not needed for the generator itself
    ours = AnchorGenerator(((16, 24), (32, 48)), ((0.5, 1.0, 2.0),) * 2)(ImageList(tensors, sizes), features)
    theirs = tv_anchors.AnchorGenerator(((16, 24), (32, 48)), ((0.5, 1.0, 2.0),) * 2)(TvImageList(tensors, sizes), features)
    assert len(ours) == 2 and ours[0].shape == (16 * 20 * 6 + 8 * 10 * 6, 4)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_anchor_by_hand():
    # size 32, ratio 2 (h/w): h = 32 sqrt 2 = 45.25, w = 22.63; corners rounded
    base = AnchorGenerator.generate_anchors((32,), (2.0,))
    assert base.tolist() == [[-11.0, -23.0, 11.0, 23.0]]


def test_anchor_sizes_that_do_not_fit_the_maps():
    tensors, sizes = _batch()
    gen = AnchorGenerator(((32,), (64,), (128,)), (1.0,))
    with pytest.raises(CnnlabError, match="anchor_sizes has 3 entries but the backbone gives 2"):
        gen(ImageList(tensors, sizes), list(_features().values()))
    with pytest.raises(CnnlabError, match="aspect_ratios"):
        AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,), (2.0,)))


def _rpn_pair(channels=8, **kw):
    torch.manual_seed(0)
    ratios = ((0.5, 1.0, 2.0),)
    sizes2 = ((16,), (32,))
    opts = dict(fg_iou_thresh=0.6, bg_iou_thresh=0.3, batch_size_per_image=32, positive_fraction=0.5, nms_thresh=0.7)
    theirs = tv_rpn.RegionProposalNetwork(
        tv_anchors.AnchorGenerator(sizes2, ((0.5, 1.0, 2.0),) * 2), tv_rpn.RPNHead(channels, 3), **opts,
        pre_nms_top_n=dict(training=200, testing=100), post_nms_top_n=dict(training=50, testing=30), **kw)
    ours = RegionProposalNetwork(
        AnchorGenerator(sizes2, ratios), RPNHead(channels, 3), **opts,
        pre_nms_top_n_train=200, pre_nms_top_n_test=100, post_nms_top_n_train=50, post_nms_top_n_test=30, **kw)
    state = {k.replace("conv.0.0.", "conv.0.conv."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    return theirs, ours


@pytest.mark.parametrize("score_thresh", [0.0, 0.5])
def test_rpn_proposals_and_losses_match_torchvision(score_thresh):
    theirs, ours = _rpn_pair(score_thresh=score_thresh)
    tensors, sizes = _batch()
    feats = _features()
    for p in ours.head.parameters():  # random, not N(0, 0.01), so that the deltas and scores matter
        torch.nn.init.normal_(p, std=0.3)
    theirs.head.load_state_dict({k.replace("conv.0.conv.", "conv.0.0."): v for k, v in ours.head.state_dict().items()})
    theirs.eval(), ours.eval()
    expected, _ = theirs(TvImageList(tensors, sizes), feats)
    got, losses = ours(ImageList(tensors, sizes), feats)
    assert losses == {}
    for e, g in zip(expected, got):
        assert len(g) <= 30
        torch.testing.assert_close(g, e)
    theirs.train(), ours.train()
    torch.manual_seed(3)
    _, expected_loss = theirs(TvImageList(tensors, sizes), feats, _targets())
    torch.manual_seed(3)
    got_boxes, got_loss = ours(ImageList(tensors, sizes), feats, _targets())
    assert all(len(b) <= 50 for b in got_boxes)
    for k in ("loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(got_loss[k], expected_loss[k])


def test_rpn_with_no_boxes_anywhere():
    _, ours = _rpn_pair()
    tensors, sizes = _batch()
    ours.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    _, losses = ours(ImageList(tensors, sizes), _features(), empty)
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_rpn_box_reg"].item() == 0.0


def _roi_pair(pool="align"):
    torch.manual_seed(0)
    opts = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=16, positive_fraction=0.25,
                bbox_reg_weights=None, score_thresh=0.01, nms_thresh=0.5, detections_per_img=20)
    theirs = tv_roi.RoIHeads(MultiScaleRoIAlign(["0", "1"], 4, 2), TvTwoMLPHead(8 * 16, 32), TvPredictor(32, 3), **opts)
    pooler = MultiScaleRoIAlign(["0", "1"], 4, 2) if pool == "align" else RoIPool("0", 4)
    ours = RoIHeads(pooler, TwoMLPHead(8 * 16, 32), FastRCNNPredictor(32, 3), **opts)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _proposals(seed=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in [(64, 80), (50, 70)]:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w - 10.0, h - 10.0])
        wh = torch.rand(40, 2, generator=g) * 30 + 4
        out.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1))
    return out


def test_roi_heads_match_torchvision():
    theirs, ours = _roi_pair()
    feats, sizes = _features(), _batch()[1]
    theirs.eval(), ours.eval()
    expected, _ = theirs(feats, _proposals(), sizes)
    got, losses = ours(feats, _proposals(), sizes)
    assert losses == {}
    for e, g in zip(expected, got):
        assert len(g["boxes"]) > 0
        for k in ("boxes", "labels", "scores"):
            torch.testing.assert_close(g[k], e[k])
    theirs.train(), ours.train()
    torch.manual_seed(9)
    _, expected_loss = theirs(feats, _proposals(), sizes, _targets())
    torch.manual_seed(9)
    _, got_loss = ours(feats, _proposals(), sizes, _targets())
    for k in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(got_loss[k], expected_loss[k])


def test_roi_heads_without_proposals():
    _, ours = _roi_pair()
    ours.eval()
    got, _ = ours(_features(), [torch.zeros(0, 4), _proposals()[1]], _batch()[1])
    assert got[0]["boxes"].shape == (0, 4) and got[0]["labels"].dtype == torch.int64 and len(got[1]["boxes"]) > 0


def test_roi_pool_variant_runs_and_generator_makes_sampling_reproducible():
    _, ours = _roi_pair(pool="pool")
    feats, sizes = _features(), _batch()[1]
    ours.train()
    ours.generator = torch.Generator().manual_seed(0)
    _, first = ours(feats, _proposals(), sizes, _targets())
    ours.generator = torch.Generator().manual_seed(0)
    torch.manual_seed(123)  # the global RNG no longer matters
    _, second = ours(feats, _proposals(), sizes, _targets())
    assert first["loss_classifier"].item() == second["loss_classifier"].item()
    assert torch.isfinite(first["loss_box_reg"])


def test_fastrcnn_loss_by_hand():
    # two RoIs: a positive of class 1 with a perfect box, a background one
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    regression = torch.zeros(2, 8)
    regression[0, 4:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # class 1's dx off by 1
    cls, box = fastrcnn_loss(logits, regression, [torch.tensor([1, 0])], [torch.zeros(2, 4)])
    assert float(cls) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert float(box) == pytest.approx((1 - 0.5 / 9) / 2)  # smooth L1 (beta 1/9) of 1, over 2 sampled RoIs


def test_transform_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 50, 90, generator=g), torch.rand(3, 120, 60, generator=g)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 100.0]]), "labels": torch.tensor([2])}]
    ours = DetectionTransform(64, 100, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    theirs = GeneralizedRCNNTransform(64, 100, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.manual_seed(0)
    batch, new_targets = ours(images, targets)
    torch.manual_seed(0)
    tv_batch, tv_targets = theirs(images, targets)
    assert torch.equal(batch.tensors, tv_batch.tensors) and batch.image_sizes == tv_batch.image_sizes
    assert batch.tensors.shape[-1] % 32 == 0 and batch.tensors.shape[-2] % 32 == 0
    for a, b in zip(new_targets, tv_targets):
        torch.testing.assert_close(a["boxes"], b["boxes"])
    assert targets[0]["boxes"].tolist() == [[1.0, 2.0, 30.0, 40.0]]  # the caller's targets are untouched
    ours.eval(), theirs.eval()
    dets = [{"boxes": new_targets[i]["boxes"].clone()} for i in range(2)]
    back = ours.postprocess(dets, batch.image_sizes, [(50, 90), (120, 60)])
    torch.testing.assert_close(back[0]["boxes"], targets[0]["boxes"])


def test_transform_rejects_bad_images():
    t = DetectionTransform(64, 100)
    with pytest.raises(CnnlabError, match=r"images\[1\] must be a float"):
        t([torch.rand(3, 10, 10), torch.zeros(3, 10, 10, dtype=torch.uint8)])
    with pytest.raises(CnnlabError, match=r"images\[0\] must be a \(C, H, W\)"):
        t([torch.rand(1, 3, 10, 10)])


def test_fixed_scale_keeps_every_image_at_one_scale_and_maps_boxes_back():
    images = [torch.rand(3, 40, 40), torch.rand(3, 70, 90)]
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 20.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 5.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    keep = DetectionTransform(64, 100, fixed_scale=1.0)
    batch, out = keep(images, targets)
    assert batch.image_sizes == [(40, 40), (70, 90)]  # min_size/max_size would give (64, 64) and (64, 82)
    assert torch.equal(out[1]["boxes"], targets[1]["boxes"])
    normalised = (images[1] - torch.tensor(keep.image_mean)[:, None, None]) / torch.tensor(keep.image_std)[:, None, None]
    torch.testing.assert_close(batch.tensors[1, :, :70, :90], normalised)
    half = DetectionTransform(64, 100, fixed_scale=0.5)
    batch, out = half(images, targets)
    assert batch.image_sizes == [(20, 20), (35, 45)]
    torch.testing.assert_close(out[0]["boxes"], targets[0]["boxes"] / 2)
    half.eval()
    back = half.postprocess([{"boxes": out[1]["boxes"].clone()}], [batch.image_sizes[1]], [(70, 90)])
    torch.testing.assert_close(back[0]["boxes"], targets[1]["boxes"])
    for bad in (0, -1.0, True):
        with pytest.raises(CnnlabError, match="fixed_scale must be a positive factor"):
            DetectionTransform(64, 100, fixed_scale=bad)
    with pytest.raises(CnnlabError, match="without fixed_size"):
        DetectionTransform(64, 100, fixed_size=(32, 32), fixed_scale=1.0)


def test_detectors_take_fixed_scale_by_name():
    import cnnlab

    for name in ("faster_rcnn", "retinanet"):
        model = cnnlab.create_model(name, backbone="resnet18", num_classes=3, fixed_scale=1.0).eval()
        assert model.transform.fixed_scale == 1.0
        with torch.no_grad():
            found = model([torch.rand(3, 48, 80)])
        assert found[0]["boxes"].shape[-1] == 4
