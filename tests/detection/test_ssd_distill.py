"""A classifier teaching an SSD's class scores per box: the crops the teacher sees, the soft term against a hand
computation, the wiring through the engine (loss named in the run, teacher recorded, the teacher reading the
step's own boxes) and the refusals."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress import distill as D
from cnnlab.compress.distill import Teacher, box_crops
from cnnlab.detection._ssd_boxes import MultiBoxLoss
from cnnlab.detection.boxes import BoxCoder
from cnnlab.engine import train
from cnnlab.engine.config import ModelConfig, TrainConfig, apply_overrides
from cnnlab.engine.tasks.detection import DetectionTask
from cnnlab.models import create_model
from tests.engine.test_detection_task import CLASSES, MODEL, det_config, make_bundle, resumes_exactly


# -- the crops ---------------------------------------------------------------------------------------------------
def test_box_crops_are_each_boxs_square_about_its_centre():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 40, 48, generator=g)
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0],  # a square: itself
                          [8.0, 10.0, 24.0, 18.0]])  # 16 x 8: the 16 x 16 square about (16, 14)
    crops = box_crops([image], [boxes], (16, 16), 1)
    # at the box's own size every sample falls on a pixel centre: the pixels themselves
    assert crops.shape == (2, 1, 16, 16)
    assert torch.allclose(crops[0, 0], image[0, 8:24, 8:24], atol=1e-6)
    assert torch.allclose(crops[1, 0], image[0, 6:22, 8:24], atol=1e-6)
    # shrunk to half: the mean of each 2 x 2 block (adaptive sampling, two samples per bin and axis)
    half = box_crops([image], [boxes[:1]], (8, 8), 1)
    assert torch.allclose(half[0, 0], F.avg_pool2d(image[:, 8:24, 8:24], 2)[0], atol=1e-6)


def test_box_crops_match_the_teachers_channels_and_skip_images_without_boxes():
    g = torch.Generator().manual_seed(1)
    rgb, grey = torch.rand(3, 32, 32, generator=g), torch.rand(1, 32, 32, generator=g)
    box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    as_grey = box_crops([rgb], [box], (16, 16), 1)
    assert torch.allclose(as_grey[0, 0], rgb.mean(0)[4:20, 4:20], atol=1e-6)
    as_rgb = box_crops([grey, rgb], [box, torch.zeros(0, 4)], (16, 16), 3)
    assert as_rgb.shape == (1, 3, 16, 16) and torch.equal(as_rgb[0, 0], as_rgb[0, 2])
    assert box_crops([rgb], [torch.zeros(0, 4)], (16, 16), 3).shape == (0, 3, 16, 16)
    with pytest.raises(CnnlabError, match="2-channel"):
        box_crops([torch.rand(4, 32, 32)], [box], (16, 16), 2)


# -- the soft term -----------------------------------------------------------------------------------------------
def _scene(seed: int):
    g = torch.Generator().manual_seed(seed)
    defaults = torch.rand(64, 2, generator=g) * 80
    defaults = torch.cat([defaults, defaults + 5 + torch.rand(64, 2, generator=g) * 40], dim=1)
    gt = defaults[torch.randperm(64, generator=g)[:3]] + torch.rand(3, 4, generator=g)
    targets = [{"boxes": gt, "labels": torch.randint(1, 5, (3,), generator=g),
                "teacher_logits": torch.randn(3, 4, generator=g) * 3},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "teacher_logits": torch.zeros(0, 4)}]
    logits, regression = torch.randn(2, 64, 5, generator=g), torch.randn(2, 64, 4, generator=g)
    return targets, logits, regression, [defaults, defaults]


def test_soft_term_is_t_squared_kl_per_positive_and_leaves_the_other_losses():
    targets, logits, regression, defaults = _scene(0)
    plain = MultiBoxLoss(BoxCoder((10.0, 10.0, 5.0, 5.0)), 0.5, 0.25)
    taught = MultiBoxLoss(BoxCoder((10.0, 10.0, 5.0, 5.0)), 0.5, 0.25)
    T, weight = 2.0, 0.7
    taught.distillation = (T, weight)
    found, without = taught(targets, logits, regression, defaults), plain(targets, logits, regression, defaults)
    assert set(without) == {"bbox_regression", "classification"}
    for name in without:  # the labels' losses are whole
        assert torch.equal(found[name], without[name])
    # by hand: each positive default box learns its box's teacher distribution over the 4 foreground classes
    matched = taught.match(targets, defaults)[0]
    positives = torch.nonzero(matched >= 0)[:, 0]
    assert len(positives) >= 3
    kl = 0.0
    for d in positives.tolist():
        p = (targets[0]["teacher_logits"][matched[d]] / T).softmax(0)
        q = (logits[0, d, 1:] / T).softmax(0)
        kl += float((p * (p / q).log()).sum())
    assert found["distillation"].item() == pytest.approx(weight * T * T * kl / len(positives), rel=1e-5)
    # a teacher that agrees with the student teaches nothing
    agree = [dict(t) for t in targets]
    agree[0]["teacher_logits"] = torch.zeros(3, 4)
    same = logits.clone()
    same[0, :, 1:] = 0.0
    assert taught(agree, same, regression, defaults)["distillation"].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(CnnlabError, match="same classes"):
        wrong = [dict(t) for t in targets]
        wrong[0]["teacher_logits"] = torch.zeros(3, 6)
        taught(wrong, logits, regression, defaults)


# -- through the engine ------------------------------------------------------------------------------------------
class _Seen(nn.Module):
    """A stand-in classifier of 1-channel 16 x 16 crops that records what it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, len(CLASSES))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1)) * 3


def _teacher(classes=CLASSES) -> Teacher:
    torch.manual_seed(5)
    return Teacher(_Seen().eval().requires_grad_(False), Path("stand-in-teacher"), "best",
                   list(classes), (1, 16, 16), {"kind": "standard", "mean": [0.5], "std": [0.25]}, "shapes", {})


def _ssd_config(tmp_path, name="taught"):
    config = det_config(tmp_path, name, epochs=1)
    config.model = ModelConfig(name="ssd", options={"backbone": "simple_cnn_bn", "size": 64, "num_maps": 3,
                                                    "min_scale": 0.15, "max_scale": 0.6})
    config.optim.lr = 1e-3
    config.distill.teacher, config.distill.temperature, config.distill.alpha = "stand-in-teacher", 2.0, 1.0
    return config


def test_a_taught_ssd_run_names_the_loss_records_the_teacher_and_shows_it_the_boxes(tmp_path, monkeypatch):
    teacher = _teacher()
    monkeypatch.setattr(D.Teacher, "load", classmethod(lambda cls, run_dir: teacher))
    bundle = make_bundle(n_train=8, n_val=4, n_test=4)
    result = train(_ssd_config(tmp_path), data=bundle)
    with open(result.run_dir / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train_loss_distillation"]) > 0
    assert "val_loss_distillation" not in row  # validation targets carry no teacher: the losses of an untaught run
    summary = json.loads((result.run_dir / "results.json").read_text())
    found = summary.get("summary", summary)
    assert found["teacher"] == "stand-in-teacher" and found["temperature"] == 2.0 and found["alpha"] == 1.0
    # the teacher saw one normalised 16 x 16 grey crop per training box of each step (8 images, 2 steps of 4)
    boxes = sum(len(t["boxes"]) for _, t in make_bundle(n_train=8).train.items)
    shown = teacher.module.inputs
    assert len(shown) == 2 and sum(len(x) for x in shown) == boxes and shown[0].shape[1:] == (1, 16, 16)
    assert float(torch.cat(shown).min()) < -1.5  # (0 - 0.5) / 0.25 = -2 for the dark background: normalised


def test_a_box_teacher_is_refused_for_other_detectors_and_other_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(D.Teacher, "load", classmethod(lambda cls, run_dir: _teacher()))
    bundle = make_bundle(n_train=4, n_val=4, n_test=4)
    config = det_config(tmp_path, "frcnn")  # the tiny Faster R-CNN stand-in: no per-box softmax to teach
    config.distill.teacher = "stand-in-teacher"
    with pytest.raises(CnnlabError, match=f"{MODEL} has no such loss"):
        train(config, data=bundle)
    monkeypatch.setattr(D.Teacher, "load", classmethod(lambda cls, run_dir: _teacher(["bar", "square"])))
    with pytest.raises(CnnlabError, match="same order"):
        DetectionTask()._prepare_teacher(_ssd_config(tmp_path), bundle, create_model(
            "ssd", backbone="simple_cnn_bn", num_classes=3, size=64, num_maps=3))
    # a config-level check still refuses models with no class logits at all
    with pytest.raises(CnnlabError, match="or an SSD detector"):
        apply_overrides(TrainConfig(), ["model.name=conv_autoencoder", "distill.teacher=runs/t"])


def test_a_taught_ssd_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(D.Teacher, "load", classmethod(lambda cls, run_dir: _teacher()))

    def config(name):
        c = _ssd_config(tmp_path, name)
        c.epochs = 2
        return c

    resumes_exactly(tmp_path, config)
