"""The detection task through the shared engine: named losses, COCO mAP per epoch, best by val_AP, exact resume,
report.html sections, images without boxes. A tiny torchvision Faster R-CNN (a 2-conv backbone, 64 px images)
and a synthetic set of squares and bars stand in for the real models and data."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.bundle import DataBundle
from cnnlab.engine import train
from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from cnnlab.engine.tasks import StepOutput, get_task
from cnnlab.engine.tasks.detection import COCO_METRICS, DetectionTask, draw_detections, model_targets

MODEL = "tiny_frcnn_test"
CLASSES = ["square", "bar"]


def tiny_frcnn(num_classes: int = 3, min_size: int = 64, max_size: int = 96) -> nn.Module:
    """torchvision's FasterRCNN on a two-convolution backbone (stride 4, BatchNorm): a few seconds per epoch."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
    backbone.out_channels = 16
    return FasterRCNN(backbone, num_classes=None, min_size=min_size, max_size=max_size,
                      rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 49, 64),
                      box_predictor=FastRCNNPredictor(64, num_classes), rpn_pre_nms_top_n_train=200,
                      rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                      rpn_batch_size_per_image=64, box_batch_size_per_image=64)


def register_stand_in() -> None:
    from cnnlab.models import list_models
    from cnnlab.models.registry import Family, register_model

    if MODEL not in list_models():
        register_model(Family(MODEL, "test stand-in: torchvision Faster R-CNN, tiny", 2015), task="detection",
                       default_input=(3, 64, 64), name=MODEL)(tiny_frcnn)


register_stand_in()


def make_items(n: int, seed: int, empty_every: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """Noisy 64 x 64 (some 64 x 80) images with 0-2 objects: class 1 a bright square, class 2 a wide bar."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        w = 80 if i % 3 == 0 else 64
        image = torch.rand(3, 64, w, generator=g) * 0.2
        boxes, labels = [], []
        if i % empty_every:
            for k in range(1 + i % 2):
                label = 1 + (i + k) % 2
                bw, bh = (16, 16) if label == 1 else (28, 10)
                x = int(torch.randint(0, w - bw, (1,), generator=g)) if k == 0 else max(0, w - bw - 2)
                y = 4 + 30 * k
                image[:, y:y + bh, x:x + bw] = torch.tensor([0.9, 0.2, 0.2] if label == 1 else [0.2, 0.3, 0.95])[:, None, None]
                boxes.append([x, y, x + bw, y + bh])
                labels.append(label)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64), "image_id": i}
        items.append((image, target))
    return items


class Batches:
    """A detection loader stand-in: lists of images and target dicts; deterministic shuffling per epoch."""

    def __init__(self, items, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.items, self.batch_size, self.shuffle, self.seed, self.epoch = items, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self):
        n = len(self.items)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                 if self.shuffle else torch.arange(n)).tolist()
        for start in range(0, n, self.batch_size):
            picked = [self.items[j] for j in order[start:start + self.batch_size]]
            yield [im for im, _ in picked], [dict(t) for _, t in picked]


def make_bundle(n_train: int = 16, n_val: int = 8, n_test: int = 8, val_items=None) -> DataBundle:
    return DataBundle(train=Batches(make_items(n_train, 1), 4, True),
                      val=Batches(val_items if val_items is not None else make_items(n_val, 2), 4, False),
                      test=Batches(make_items(n_test, 3), 4, False), classes=list(CLASSES), input_shape=(3, 64, 64),
                      preprocess=None, preprocess_state={"kind": "none"})


def det_config(tmp_path, name: str = "det", epochs: int = 2, **top) -> TrainConfig:
    top = {"plots": False, **top}
    return TrainConfig(model=ModelConfig(name=MODEL), data=DataConfig(name="synthetic_det", batch_size=4, val_fraction=0.2),
                       optim=OptimConfig(lr=0.01, schedule="constant", weight_decay=1e-4), epochs=epochs,
                       out_dir=str(tmp_path), name=name, quiet=True, device="cpu", threads=1, **top)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 2-epoch run with plots and report, shared by the checks of its folder (and the CLI tests)."""
    out = tmp_path_factory.mktemp("det_runs")
    config = det_config(out, "run", plots=True)
    result = train(config, data=make_bundle())
    return result


# ---------------------------------------------------------------- step, meter, evaluate


def test_step_returns_the_sum_of_the_named_losses_and_keeps_each():
    task = get_task("detection")
    torch.manual_seed(0)
    model = tiny_frcnn()
    images, targets = next(iter(make_bundle().train))
    torch.manual_seed(1)
    out = task.step(model, (images, targets), det_config("unused"))
    torch.manual_seed(1)
    expected = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])  # torchvision itself
    assert set(out.output) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for k, v in expected.items():
        assert torch.equal(out.output[k], v.float())
    assert torch.allclose(out.loss, sum(expected.values()), rtol=1e-6) and out.count == len(images)


def test_meter_averages_each_loss_over_images():
    meter = get_task("detection").meter(torch.device("cpu"))
    meter.update(StepOutput(torch.tensor(3.0), {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}, None, 4))
    meter.update(StepOutput(torch.tensor(6.0), {"loss_a": torch.tensor(4.0), "loss_b": torch.tensor(2.0)}, None, 2))
    values = meter.compute()
    assert values == pytest.approx({"loss": (12 + 12) / 6, "loss_a": (4 + 8) / 6, "loss_b": (8 + 4) / 6})
    assert list(values) == ["loss", "loss_a", "loss_b"]


def test_a_model_that_returns_no_loss_dict_and_a_classification_batch_are_clear_errors():
    task = get_task("detection")
    with pytest.raises(CnnlabError, match="dict of named losses"):
        task.step(lambda images, targets: torch.zeros(2), ([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4),
                                                                                  "labels": torch.zeros(0).long()}]), None)
    with pytest.raises(CnnlabError, match="detection batches are"):
        task.step(tiny_frcnn(), (torch.zeros(2, 3, 8, 8), torch.zeros(2).long()), None)


def test_evaluate_is_mean_ap_of_the_eval_mode_predictions_and_changes_nothing():
    from cnnlab.detection.metrics import evaluate as mean_ap

    task = get_task("detection")
    torch.manual_seed(0)
    model = tiny_frcnn()
    bundle = make_bundle()
    for images, targets in bundle.train:  # a few steps so that the BatchNorm statistics are not the initial ones
        model(images, model_targets(targets))["loss_classifier"].backward()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = task.evaluate(model, bundle.val, bundle)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched
    model.eval()
    with torch.no_grad():
        preds = [p for images, _ in bundle.val for p in model(images)]
    targets = [t for _, ts in bundle.val for t in ts]
    expected = mean_ap(preds, targets, "coco", class_names=CLASSES)
    assert result.metrics == pytest.approx({k: expected[k] for k in COCO_METRICS}, abs=1e-12)
    assert result.count == 8 and math.isfinite(result.loss) and result.loss > 0
    again = task.evaluate(model.train(), bundle.val, bundle)
    assert again.loss == result.loss  # the loss pass samples with its own seed: repeatable
    assert set(result.details["losses"]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert result.loss == pytest.approx(sum(result.details["losses"].values()), rel=1e-6)


def test_evaluation_forwards_at_most_eight_images_whatever_the_loader_batch():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detector, self.sizes = tiny_frcnn(), []

        def forward(self, images, targets=None):
            self.sizes.append(len(images))
            return self.detector(images, targets)

    torch.manual_seed(0)
    model = Counting()
    result = get_task("detection").evaluate(model, Batches(make_items(20, 2), 20, False), make_bundle())
    assert result.count == 20 and max(model.sizes) == 8 and sum(model.sizes) == 2 * 20  # eval + loss passes


def test_the_loss_pass_can_be_skipped(monkeypatch):
    torch.manual_seed(0)
    model, bundle = tiny_frcnn(), make_bundle()
    full = get_task("detection").evaluate(model, bundle.val, bundle)
    monkeypatch.setattr(DetectionTask, "compute_loss", False)
    fast = get_task("detection").evaluate(model, bundle.val, bundle)
    assert math.isnan(fast.loss) and fast.details["losses"] == {} and fast.metrics == full.metrics


def test_images_without_boxes_train_and_evaluate():
    task = get_task("detection")
    torch.manual_seed(0)
    model = tiny_frcnn()
    empty = make_items(6, 5, empty_every=1)  # every image without boxes
    assert all(len(t["boxes"]) == 0 for _, t in empty)
    images, targets = [im for im, _ in empty[:3]], [t for _, t in empty[:3]]
    out = task.step(model, (images, targets), None)
    out.loss.backward()  # torchvision trains on background-only images
    assert out.output["loss_box_reg"] == 0 and out.loss > 0
    result = task.evaluate(model, Batches(empty, 4, False), make_bundle())
    assert result.metrics["AP"] == -1 and result.count == 6  # pycocotools' -1: nothing to measure
    assert math.isfinite(result.loss)


def test_crowd_and_degenerate_boxes_are_left_out_of_what_the_model_learns():
    t = {"boxes": torch.tensor([[0., 0, 4, 4], [1, 1, 1, 5], [2, 2, 6, 6]]), "labels": torch.tensor([1, 2, 1]),
         "iscrowd": torch.tensor([0, 0, 1]), "area": torch.tensor([16., 0, 16]), "masks": torch.zeros(3, 8, 8)}
    kept = model_targets([t])[0]
    assert set(kept) == {"boxes", "labels"} and kept["labels"].tolist() == [1, 2]
    assert model_targets([t], drop_degenerate=True)[0]["labels"].tolist() == [1]


def test_losses_are_lower_is_better_and_the_monitor_is_val_ap():
    task = get_task("detection")
    assert not task.higher_is_better("train_loss_classifier") and not task.higher_is_better("val_loss")
    assert task.higher_is_better("val_AP") and task.monitor_keys()[0] == "val_AP"


def test_mixup_and_tta_flip_are_refused():
    task = DetectionTask()
    config = det_config("unused")
    config.data.mixup = 0.2
    with pytest.raises(CnnlabError, match="mixup"):
        task.build_data(config, torch.device("cpu"))
    config.data.mixup, config.tta_flip = 0.0, True
    with pytest.raises(CnnlabError, match="tta_flip"):
        task.build_data(config, torch.device("cpu"))


def test_draw_detections_draws_true_and_predicted_boxes():
    from torchvision.utils import draw_bounding_boxes

    image = torch.zeros(3, 20, 30)
    target = {"boxes": torch.tensor([[2., 2, 10, 10]]), "labels": torch.tensor([1])}
    pred = {"boxes": torch.tensor([[12., 4, 25, 15], [0, 0, 5, 5]]), "labels": torch.tensor([2, 1]),
            "scores": torch.tensor([0.9, 0.1])}
    drawn = draw_detections(image, pred, CLASSES, target=target, score_thresh=0.5)
    blank = torch.zeros(3, 20, 30, dtype=torch.uint8)
    expected = draw_bounding_boxes(draw_bounding_boxes(blank, target["boxes"], colors="#00d000"),
                                   pred["boxes"][:1], labels=["bar 0.90"], colors="#ff2a2a", fill_labels=True,
                                   label_colors="white")
    assert torch.equal(drawn, expected)  # the low-scored prediction is not drawn
    assert draw_detections(image, pred, CLASSES, min_side=60).shape == (3, 60, 90)


# ---------------------------------------------------------------- the engine


def test_train_writes_losses_and_map_per_epoch_and_keeps_the_best_by_val_ap(trained_run):
    run_dir = trained_run.run_dir
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    names = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    for r in rows:
        parts = sum(float(r[f"train_{n}"]) for n in names)
        assert float(r["train_loss"]) == pytest.approx(parts, rel=1e-4)
        assert {"val_loss", "val_AP", "val_AP50", "val_AP75", "val_AR100"} <= set(r)
        assert -1 <= float(r["val_AP"]) <= 1
    assert "train_AP" not in rows[0]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["monitor"] == "val_AP"  # the config's default (val_loss) means the task's
    history = trained_run.history
    best = max(range(2), key=lambda i: (history[i]["val_AP"], -i))  # the first epoch wins a tie
    assert json.loads((run_dir / "last.json").read_text())["best_epoch"] == best + 1
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == best + 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "detection" and results["reported_checkpoint"] == "best"
    assert set(COCO_METRICS) <= set(results["test_metrics"])
    assert results["test_AP"] == trained_run.test.metrics["AP"]
    assert [r["class"] for r in results["per_class"]] == CLASSES
    assert sum(r["gt"] for r in results["per_class"]) == sum(len(t["boxes"]) for _, t in make_items(8, 3))


def test_the_report_has_pr_curves_per_class_ap_and_drawn_images(trained_run):
    run_dir = trained_run.run_dir
    for png in ("pr_curves.png", "detections.png", "curves.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    html = (run_dir / "report.html").read_text()
    for part in ('id="per-class-ap"', 'id="precision-recall-curves"', 'id="detections"', "train loss classifier"):
        assert part in html, part
    assert html.count("data:image/png;base64,") == 3  # learning curves, PR curves, detections


def test_load_run_rebuilds_the_detector_with_the_background_class(trained_run):
    from cnnlab.engine.runs import load_run

    run = load_run(trained_run.run_dir)
    assert run.task == "detection" and run.classes == CLASSES and run.tag == "best"
    assert run.model.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    reported = trained_run.model
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), reported.state_dict().values()))


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    class Interrupted(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Interrupted

    train(det_config(tmp_path, "straight"), data=make_bundle())
    with pytest.raises(Interrupted):
        train(det_config(tmp_path, "split"), data=make_bundle(), callbacks=[stop_after_one])
    train(det_config(tmp_path, "split"), data=make_bundle(), resume=True)
    for name in ("last.safetensors", "last.state.safetensors", "best.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on the CPU
    straight = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    split = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    drop = ("time_s", "cpu_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == \
           [{k: v for k, v in r.items() if k not in drop} for r in split]


def test_monitor_choices(tmp_path):
    with pytest.raises(CnnlabError, match="not a metric of the detection task; choose val_AP"):
        train(det_config(tmp_path, "bad", monitor="val_acc"), data=make_bundle())
    result = train(det_config(tmp_path, "ap50", epochs=1, monitor="val_AP50"), data=make_bundle(n_train=4, n_val=4))
    assert result.config.monitor == "val_AP50"


# ---------------------------------------------------------------- cnnlab's own Faster R-CNN


def _real_config(tmp_path, name: str) -> TrainConfig:
    config = det_config(tmp_path, name)
    config.model.name = "faster_rcnn"  # a small registered classifier as the backbone, through feature_info
    config.model.options = {"backbone": "fmnist_net", "min_size": 64, "max_size": 96, "fpn_channels": 32,
                            "representation_size": 64}
    return config


def test_cnnlab_faster_rcnn_trains_resumes_exactly_and_reloads(tmp_path):
    from cnnlab.engine.runs import load_run
    from cnnlab.models import list_models

    if "faster_rcnn" not in list_models(task="detection"):
        pytest.skip("cnnlab.detection.faster_rcnn is not there yet")

    class Interrupted(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Interrupted

    straight = train(_real_config(tmp_path, "straight"), data=make_bundle(n_train=8, n_val=4, n_test=4))
    with pytest.raises(Interrupted):
        train(_real_config(tmp_path, "split"), data=make_bundle(n_train=8, n_val=4, n_test=4),
              callbacks=[stop_after_one])
    train(_real_config(tmp_path, "split"), data=make_bundle(n_train=8, n_val=4, n_test=4), resume=True)
    for name in ("last.safetensors", "last.state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    row = straight.history[-1]
    assert {"train_loss_classifier", "train_loss_box_reg", "train_loss_objectness", "train_loss_rpn_box_reg"} <= set(row)
    assert row["train_loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("train_loss_")), rel=1e-5)
    run = load_run(tmp_path / "straight")
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), straight.model.state_dict().values()))


# ---------------------------------------------------------------- the one-stage detectors through the same engine

ONE_STAGE = {
    "ssd": {"backbone": "fmnist_net", "size": 64},
    "retinanet": {"backbone": "fmnist_net", "min_size": 64, "max_size": 96, "fpn_channels": 32},
    "yolov1": {"backbone": "fmnist_net", "size": 64, "grid_size": 4},
    "yolov3": {"backbone": "resnet18", "size": 64, "anchors": "kmeans", "anchors_per_scale": 1},
}


def resumes_exactly(tmp_path, config):
    """``config(run_name)`` (2 epochs) trained straight, and again interrupted after epoch 1 and resumed, on small
    bundles of the synthetic set: the two runs' last weights and optimiser state are bitwise equal (CPU). Returns
    the straight run's result."""
    class Interrupted(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Interrupted

    bundle = lambda: make_bundle(n_train=8, n_val=4, n_test=4)  # noqa: E731
    straight = train(config("straight"), data=bundle())
    with pytest.raises(Interrupted):
        train(config("split"), data=bundle(), callbacks=[stop_after_one])
    train(config("split"), data=bundle(), resume=True)
    for file in ("last.safetensors", "last.state.safetensors"):
        a, b = load_file(tmp_path / "straight" / file), load_file(tmp_path / "split" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    return straight


@pytest.mark.parametrize("name", sorted(ONE_STAGE))
def test_one_stage_detectors_train_and_resume_exactly(tmp_path, name):
    """1 epoch + resume = 2 epochs straight, bitwise; yolov3's k-means anchors are fitted from the training boxes
    by the task (and travel in the checkpoint)."""
    def config(run):
        c = det_config(tmp_path, run)
        c.model.name, c.model.options = name, dict(ONE_STAGE[name])
        c.optim = OptimConfig(optimizer="adamw", lr=1e-3, schedule="constant", weight_decay=1e-4)
        return c

    straight = resumes_exactly(tmp_path, config)
    row = straight.history[-1]
    assert math.isfinite(row["train_loss"]) and "val_AP" in row
    assert row["train_loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("train_loss_")), rel=1e-5)
    if name == "yolov3":  # anchors fitted by k-means to the data's boxes, in the model's 64 px input
        anchors = load_file(tmp_path / "straight" / "last.safetensors")["anchors"]
        assert anchors.shape == (3, 2) and (anchors > 2).all() and (anchors < 64).all()
