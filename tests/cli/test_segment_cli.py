"""`cnnlab segment`, `cnnlab eval` and `cnnlab predict` on a segmentation run.

The run comes from the tiny segmenter and synthetic data of tests/engine/test_segmentation_task.py; where a
command builds the run's data, the task's data builder is replaced by that data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnlab.cli.main import main
from cnnlab.engine import train
from cnnlab.engine.tasks.segmentation import PALETTE, SegmentationTask, overlay, share_text
from tests.engine.test_segmentation_task import CLASSES, NORM, make_bundle, make_pairs, seg_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_cli")
    train(seg_config(out, "run", epochs=2), data=make_bundle())
    return out / "run"


@pytest.fixture
def images(tmp_path):
    """A grey 32 x 32 canvas like the training images, and an RGB 48 x 40 one (resized for the model)."""
    grey = make_pairs(1, 9)[0][0, 0].numpy()
    rgb = np.stack([np.kron(make_pairs(1, 10)[0][0, 0].numpy(), np.ones((2, 2), np.uint8))[:48, :40]] * 3, -1)
    paths = [tmp_path / "canvas.png", tmp_path / "large.jpg"]
    Image.fromarray(grey).save(paths[0])
    Image.fromarray(rgb).save(paths[1], quality=95)
    return [str(p) for p in paths]


def _expected_labels(run_dir, path):
    """The reported model on one file, by hand: read grey at 32 x 32 (PIL), normalised, logits back to the size."""
    from cnnlab.data.folder import read_image
    from cnnlab.engine.runs import load_run

    rgb = read_image(path, 3, None)
    x = read_image(path, 1, (32, 32)).float()[None] / 255
    with torch.no_grad():
        logits = load_run(run_dir).model(NORM(x))
    logits = F.interpolate(logits, size=tuple(rgb.shape[1:]), mode="bilinear", align_corners=False)
    return rgb, logits.argmax(1)[0]


def test_segment_writes_a_palette_mask_and_an_overlay_per_image(run_dir, images, tmp_path, capsys):
    out = tmp_path / "found"
    assert main(["segment", str(run_dir), *images, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in out.iterdir()) == ["canvas_mask.png", "canvas_overlay.png", "large_mask.png",
                                                      "large_overlay.png"]
    for path, stem, line in zip(images, ("canvas", "large"), printed[1:]):
        rgb, labels = _expected_labels(run_dir, path)
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == (rgb.shape[2], rgb.shape[1])
        assert np.array_equal(np.array(mask), labels.numpy())  # the pixel values are the labels
        assert mask.getpalette()[:9] == [v for c in PALETTE[:3] for v in c]  # shown in the VOC colours
        drawn = torch.from_numpy(np.array(Image.open(out / f"{stem}_overlay.png"))).permute(2, 0, 1)
        assert torch.equal(drawn, overlay(rgb, labels))
        fractions = torch.bincount(labels.flatten(), minlength=3).double() / labels.numel()
        assert line.startswith(f"{path} ({rgb.shape[2]}x{rgb.shape[1]}): ")
        for c in range(3):
            if fractions[c] > 0:
                assert f"{CLASSES[c]} {share_text(float(fractions[c]))}" in line
    assert "square" in printed[1]  # the canvas's square is found


def test_segment_errors_are_clear_and_write_nothing(run_dir, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "none"
    assert main(["segment", str(run_dir), images[0], str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    assert main(["segment", str(tmp_path / "no_run"), images[0], "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert main(["segment", str(run_dir), images[0], "--alpha", "2"]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
    import cnnlab.engine.runs as runs

    real = runs.load_run
    monkeypatch.setattr(runs, "load_run", lambda *a: type("Run", (), {**vars(real(*a)), "task": "classification"})())
    assert main(["segment", str(run_dir), images[0], "--out", str(out)]) == 2
    assert "is a classification run; cnnlab segment needs a segmentation run" in capsys.readouterr().err
    assert not out.exists()


def test_eval_reproduces_results_json_and_predict_lists_class_shares(run_dir, images, monkeypatch, capsys):
    monkeypatch.setattr(SegmentationTask, "build_data", lambda self, config, device: make_bundle())
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert f"test mIoU {results['test_miou']:.4f}, pixel acc {results['test_pixel_acc']:.4f}" in capsys.readouterr().out
    assert main(["predict", str(run_dir), images[0], "--top", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: background ") and line.count("%") <= 2
