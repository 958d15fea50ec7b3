"""The generic Faster R-CNN builder: any registered classifier as backbone, the interface, errors, training, transfer."""
import pytest
import torch

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.detection.faster_rcnn import OPTIONS, FasterRCNN, faster_rcnn
from cnnlab.models.registry import create_model, model_info

SMALL = dict(min_size=64, max_size=96, fpn_channels=32, representation_size=64)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]


def _empty():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])}, _empty()]


def _check_detections(dets, images, num_classes):
    assert len(dets) == len(images)
    for det, image in zip(dets, images):
        assert set(det) == {"boxes", "labels", "scores"}
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape[1:] == (4,)
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == det["labels"].shape
        if len(det["labels"]):
            assert 1 <= det["labels"].min() and det["labels"].max() < num_classes
            h, w = image.shape[-2:]
            assert det["boxes"][:, 2].max() <= w + 1e-3 and det["boxes"][:, 3].max() <= h + 1e-3
            assert (det["scores"][:-1] >= det["scores"][1:]).all()


@pytest.mark.parametrize("backbone, fpn, maps", [
    ("resnet18", True, 5), ("resnet18", False, 1), ("vgg11", False, 1), ("mobilenet_v2", True, 5),
    ("simple_cnn_bn", True, 3), ("simple_cnn_bn", False, 1),
])
def test_any_classifier_as_backbone(backbone, fpn, maps):
    model = faster_rcnn(backbone=backbone, fpn=fpn, num_classes=3, box_score_thresh=0.0, **SMALL)
    assert len(model.backbone.names) == maps == len(model.rpn.anchor_generator.sizes)
    images = _images()
    losses = model(images, _targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        dets = model(images)
    _check_detections(dets, images, 3)
    assert any(len(d["boxes"]) for d in dets)


def test_without_fpn_the_stride_16_map():
    model = faster_rcnn(backbone="resnet18", fpn=False, num_classes=3, **SMALL)
    assert model.backbone.strides == [16] and model.backbone.out_channels == 256  # layer3
    assert model.rpn.anchor_generator.sizes == ((128.0, 256.0, 512.0),)  # the paper's anchors at stride 16
    assert not any(n.startswith("body.layer4") for n, _ in model.backbone.named_parameters())  # never runs
    assert not any(n.startswith("body.fc") for n, _ in model.backbone.named_parameters())
    last = faster_rcnn(backbone="resnet18", fpn=False, returned_stages=[4], num_classes=3, **SMALL)
    assert last.backbone.strides == [32] and last.backbone.out_channels == 512


def test_registered_for_detection_and_options_by_torchvision_names():
    assert {"faster_rcnn", "fasterrcnn_resnet50_fpn"} <= set(cnnlab.list_models(task="detection"))
    assert model_info("fasterrcnn_resnet50_fpn").family.paper.startswith("Ren et al.")
    model = create_model("faster_rcnn", backbone="simple_cnn_bn", num_classes=4, rpn_pre_nms_top_n_test=123,
                         rpn_post_nms_top_n_train=77, box_detections_per_img=9, box_nms_thresh=0.3, box_fg_iou_thresh=0.6,
                         rpn_batch_size_per_image=64, bbox_reg_weights=(5.0, 5.0, 2.0, 2.0), image_mean=[0.5] * 3, **SMALL)
    assert isinstance(model, FasterRCNN) and model.model_name == "faster_rcnn" and model.num_classes == 4
    assert model.rpn.pre_nms_top_n_test == 123 and model.rpn.post_nms_top_n_train == 77
    assert model.roi_heads.detections_per_img == 9 and model.roi_heads.nms_thresh == 0.3
    assert model.roi_heads.proposal_matcher.high_threshold == 0.6 and model.rpn.fg_bg_sampler.batch_size_per_image == 64
    assert model.roi_heads.box_coder.weights == (5.0, 5.0, 2.0, 2.0) and model.transform.image_mean == [0.5] * 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    for name in ("min_size", "max_size", "image_mean", "image_std", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_test",
                 "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_positive_fraction", "rpn_score_thresh",
                 "box_score_thresh", "box_bg_iou_thresh", "box_batch_size_per_image", "box_positive_fraction"):
        assert name in OPTIONS
    with pytest.raises(CnnlabError, match="did you mean box_score_thresh"):
        create_model("faster_rcnn", backbone="simple_cnn_bn", box_score_tresh=0.1)


def test_meta_parameter_count():
    assert 41_000_000 < model_info("fasterrcnn_resnet50_fpn").num_params < 42_500_000  # torchvision's: 41.76M


def test_anchors_that_do_not_fit_the_feature_maps():
    with pytest.raises(CnnlabError, match="anchor_sizes.*3 entries.*5 feature maps"):
        faster_rcnn(backbone="resnet18", anchor_sizes=((16,), (32,), (64,)), num_classes=3, **SMALL)
    with pytest.raises(CnnlabError, match="same number"):  # simple_cnn_bn + FPN: 3 maps
        faster_rcnn(backbone="simple_cnn_bn", anchor_sizes=((16,), (32, 48), (64,)), num_classes=3, **SMALL)
    ok = faster_rcnn(backbone="resnet18", fpn=False, anchor_sizes=((16, 32, 64),), aspect_ratios=(0.5, 1.0),
                     num_classes=3, **SMALL)
    assert ok.rpn.head.cls_logits.out_channels == 6


def test_roi_pool_choice():
    model = faster_rcnn(backbone="simple_cnn_bn", fpn=False, roi_pool="pool", roi_output_size=5, num_classes=3, **SMALL)
    assert all(torch.isfinite(v) for v in model(_images(), _targets()).values())
    with pytest.raises(CnnlabError, match="roi_pool='pool' pools one feature map"):
        faster_rcnn(backbone="simple_cnn_bn", fpn=True, roi_pool="pool", num_classes=3, **SMALL)


def test_images_without_boxes_train_and_evaluate():
    model = faster_rcnn(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    images = _images()
    losses = model(images, [_empty(), _empty()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    model.eval()
    _check_detections(model(images), images, 3)


@pytest.mark.parametrize("bad, field", [
    ({"boxes": torch.tensor([[30.0, 10.0, 20.0, 40.0]]), "labels": torch.tensor([1])}, "boxes"),
    ({"boxes": torch.tensor([[1.0, 1.0, float("nan"), 40.0]]), "labels": torch.tensor([1])}, "boxes"),
    ({"boxes": torch.tensor([[1.0, 1.0, 20.0, 40.0]]), "labels": torch.tensor([3])}, "labels"),
    ({"boxes": torch.tensor([[1.0, 1.0, 20.0, 40.0]]), "labels": torch.tensor([1], dtype=torch.int32)}, "labels"),
    ({"boxes": torch.tensor([1.0, 1.0, 20.0, 40.0]), "labels": torch.tensor([1])}, "boxes"),
])
def test_bad_targets_name_image_and_field(bad, field):
    model = faster_rcnn(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    with pytest.raises(CnnlabError, match=rf"targets\[1\]\['{field}'\]"):
        model(_images(), [_targets()[0], bad])
    with pytest.raises(CnnlabError, match="needs targets"):
        model(_images())


def _square_scene(seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 64, 64, generator=g) * 0.2
    x, y = (int(v) for v in torch.randint(4, 30, (2,), generator=g))
    image[:, y:y + 28, x:x + 28] = 0.9
    return image, {"boxes": torch.tensor([[float(x), float(y), x + 28.0, y + 28.0]]), "labels": torch.tensor([1])}


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = faster_rcnn(backbone="simple_cnn_bn", num_classes=3, min_size=64, max_size=96, fpn_channels=64,
                        representation_size=128, box_batch_size_per_image=128)
    scenes = [_square_scene(s) for s in (1, 2)]
    images, targets = [s[0] for s in scenes], [s[1] for s in scenes]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(12):
        torch.manual_seed(0)  # the same sampled anchors and RoIs each step: a clean comparison
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.7 * totals[0], totals


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from cnnlab.engine import TrainConfig, train
    from cnnlab.engine.config import apply_overrides

    out = tmp_path_factory.mktemp("runs")
    config = apply_overrides(TrainConfig(), [
        "model.name=simple_cnn_bn", 'model.options={"hidden": [32]}', "data.name=digits", "data.batch_size=64",
        "data.train_limit=256", "epochs=1", "device=cpu", "plots=false", "quiet=true", f"out_dir={out}", "name=digits",
        "threads=1"])
    return train(config).run_dir


def test_backbone_weights_from_a_classification_run(digits_run):
    from cnnlab.engine.runs import load_run

    run = load_run(digits_run)
    model = faster_rcnn(backbone="simple_cnn_bn", num_classes=3, backbone_weights=str(digits_run), **SMALL)
    ours, trained = model.backbone.body.state_dict(), run.model.state_dict()
    # the run saw grey 8x8 digits: its first conv, spread over R, G, B, sees their mean
    torch.testing.assert_close(ours["stages.0.0.conv.weight"], trained["stages.0.0.conv.weight"].repeat(1, 3, 1, 1) / 3)
    torch.testing.assert_close(ours["stages.1.0.norm.running_mean"], trained["stages.1.0.norm.running_mean"])
    assert type(model.backbone.body.stages[1][0].norm).__name__ == "FrozenBatchNorm2d"  # pretrained: frozen, as torchvision
    assert model.transform.image_mean == [run.preprocess["mean"][0]] * 3  # and normalised as that run was
    assert all(torch.isfinite(v) for v in model(_images(), _targets()).values())


def test_backbone_weights_from_a_file_and_trainable_layers(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=10)  # a file in torchvision's layout, recognised and converted
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model = faster_rcnn(backbone="resnet18", num_classes=3, backbone_weights=str(path), trainable_backbone_layers=2, **SMALL)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[0].residual.conv1.conv.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(body.stem.norm.running_var, source.bn1.running_var)
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}  # the last 2 of the 5 stages (stem, layer1..4)
    wrong = tmp_path / "other.pt"
    torch.save(create_model("simple_cnn_bn").state_dict(), wrong)
    with pytest.raises(CnnlabError, match="do not fit resnet18"):
        faster_rcnn(backbone="resnet18", num_classes=3, backbone_weights=str(wrong), **SMALL)
    with pytest.raises(CnnlabError, match="neither a run folder nor a weights file"):
        faster_rcnn(backbone="resnet18", num_classes=3, backbone_weights=str(tmp_path / "nothing"), **SMALL)
    with pytest.raises(CnnlabError, match="backbone_weights is empty"):  # an unset shell variable
        faster_rcnn(backbone="resnet18", num_classes=3, backbone_weights="", **SMALL)
    with pytest.raises(CnnlabError, match="trainable_backbone_layers must be in 0..5"):
        faster_rcnn(backbone="resnet18", num_classes=3, trainable_backbone_layers=6, **SMALL)


def test_reset_classifier_for_new_classes():
    model = faster_rcnn(backbone="simple_cnn_bn", num_classes=3, **SMALL)
    model.reset_classifier(4)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4 and model.num_classes == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
