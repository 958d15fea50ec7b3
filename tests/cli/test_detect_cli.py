"""`cnnlab detect`, `cnnlab eval` and `cnnlab predict` on a detection run, and `cnnlab train` of a detector.

The run comes from the tiny torchvision Faster R-CNN and synthetic data of tests/engine/test_detection_task.py;
the task's data builder is replaced by that data where a command builds it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.cli.main import main
from cnnlab.engine import train
from cnnlab.engine.tasks.detection import DetectionTask, draw_detections
from tests.engine.test_detection_ddp import write_coco
from tests.engine.test_detection_task import CLASSES, MODEL, det_config, make_bundle, make_items


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("det_cli")
    train(det_config(out, "run", epochs=1), data=make_bundle(n_train=8, n_val=4, n_test=8))
    return out / "run"


@pytest.fixture(scope="module")
def confident_run(run_dir, tmp_path_factory):
    """The run with its classifier's bias pushed to "bar": every kept proposal scores ~1 (objects to list)."""
    from cnnlab.engine.checkpoint import load_checkpoint, save_checkpoint
    from cnnlab.engine.runs import load_run

    out = tmp_path_factory.mktemp("det_confident") / "run"
    shutil.copytree(run_dir, out)
    run = load_run(out, "best")
    with torch.no_grad():
        run.model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-20.0, -20.0, 20.0]))
    save_checkpoint(out, "best", run.model, load_checkpoint(out, "best").meta)
    return out


@pytest.fixture
def images(tmp_path):
    """Two image files: an RGB 64 x 80 canvas with objects, and a greyscale 50 x 40 one."""
    rgb = (make_items(1, 7)[0][0] * 255).round().byte().permute(1, 2, 0).numpy()
    paths = [tmp_path / "canvas.png", tmp_path / "grey.jpg"]
    Image.fromarray(rgb).save(paths[0])
    Image.fromarray(np.full((50, 40), 90, np.uint8), mode="L").save(paths[1])
    return [str(p) for p in paths]


def _expected(run_dir, path, thresh):
    """The run's reported model on one image file, read as detect reads it (RGB, its own size, 0..1)."""
    from cnnlab.data.folder import read_image
    from cnnlab.engine.runs import load_run

    image = read_image(path, 3, None)
    with torch.no_grad():
        pred = load_run(run_dir).model([image.float() / 255])[0]
    keep = pred["scores"] >= thresh
    return image, {k: v[keep] for k, v in pred.items()}


def test_detect_writes_drawn_images_and_the_boxes_of_each(run_dir, images, tmp_path, capsys):
    out = tmp_path / "found"
    assert main(["detect", str(run_dir), *images, "--out", str(out), "--score-thresh", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "detections.json").read_text())
    assert report["classes"] == CLASSES and report["checkpoint"] == "best" and report["score_thresh"] == 0
    assert [r["file"] for r in report["images"]] == images
    for record, path, size in zip(report["images"], images, [(64, 80), (50, 40)]):
        image, expected = _expected(run_dir, path, 0.0)
        assert (record["height"], record["width"]) == size
        assert len(record["detections"]) == len(expected["boxes"])
        for d, box, label, score in zip(record["detections"], expected["boxes"].tolist(), expected["labels"].tolist(),
                                        expected["scores"].tolist()):
            assert d["label_id"] == label and d["label"] == CLASSES[label - 1] and d["score"] == pytest.approx(score)
            assert d["box"] == pytest.approx(box, abs=0.006)  # rounded to 2 decimals
            assert 0 <= box[0] <= box[2] <= size[1] and 0 <= box[1] <= box[3] <= size[0]
        drawn = torch.from_numpy(np.array(Image.open(record["drawn"]))).permute(2, 0, 1)
        assert torch.equal(drawn, draw_detections(image, expected, CLASSES, score_thresh=0.0))
    assert sorted(p.name for p in out.iterdir()) == ["canvas.png", "detections.json", "grey.png"]
    assert f"boxes: {out / 'detections.json'}" in capsys.readouterr().out


def test_detect_takes_a_checkpoint_file_or_bare_weights_with_model_and_classes(run_dir, images, tmp_path, capsys):
    args = [images[0], "--score-thresh", "0.0", "--device", "cpu"]
    assert main(["detect", str(run_dir / "best.safetensors"), *args, "--out", str(tmp_path / "a")]) == 0
    weights = tmp_path / "w" / "detector.safetensors"
    weights.parent.mkdir()
    shutil.copy(run_dir / "best.safetensors", weights)
    assert main(["detect", str(weights), *args, "--out", str(tmp_path / "b")]) == 2
    assert "give --model NAME" in capsys.readouterr().err
    assert main(["detect", str(weights), *args, "--out", str(tmp_path / "b"), "--model", MODEL,
                 "--classes", ",".join(CLASSES)]) == 0
    a, b = (json.loads((tmp_path / d / "detections.json").read_text())["images"][0]["detections"] for d in "ab")
    assert a == b and a  # the same weights find the same boxes


def test_detect_errors_name_the_file_and_write_nothing(run_dir, images, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["detect", str(run_dir), images[0], str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    assert main(["detect", str(run_dir), images[0], "--score-thresh", "1.5"]) == 2
    assert "--score-thresh must be in [0, 1]" in capsys.readouterr().err


def test_eval_prints_the_map_table_and_reproduces_results_json(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(DetectionTask, "build_data",
                        lambda self, config, device: make_bundle(n_train=8, n_val=4, n_test=8))
    assert main(["eval", str(run_dir), "--device", "cpu", "--metric", "voc"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    assert f"test AP {results['test_AP']:.4f}, AP50 {results['test_AP50']:.4f}" in out
    header = [line for line in out.splitlines() if line.split()[:3] == ["AP", "AP50", "AP75"]]
    assert header and header[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                            "ARs", "ARm", "ARl"]
    coco, voc = out.split("voc (IoU 0.5, all points): mAP")
    rows = {line.split()[0]: line.split() for line in coco.splitlines() if line.split()[:1] in (["square"], ["bar"])}
    for r in results["per_class"]:
        assert rows[r["class"]][1:4] == [str(r["gt"]), f"{r['AP']:.4f}", f"{r['AP50']:.4f}"]
    assert [line.split()[0] for line in voc.splitlines()[3:]] == CLASSES  # the VOC table, per class


def test_predict_lists_the_objects_of_a_detection_run_at_the_image_size(confident_run, images, capsys):
    assert main(["predict", str(confident_run), images[0], "--top", "2"]) == 0
    image, expected = _expected(confident_run, images[0], 0.5)
    assert len(expected["boxes"]) > 2
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: {len(expected['boxes'])} objects scored >= 50%")
    for box, label in zip(expected["boxes"][:2].tolist(), expected["labels"][:2].tolist()):
        assert f"{CLASSES[label - 1]} " in line and f"({', '.join(f'{v:.0f}' for v in box)})" in line


def test_train_cli_trains_a_detector(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(DetectionTask, "build_data", lambda self, config, device: make_bundle(4, 4, 4))
    code = main(["train", "--model", MODEL, "--data", "synthetic_det", "--epochs", "1", "--out-dir", str(tmp_path),
                 "--name", "cli", "--quiet", "--device", "cpu", "--set", 'model.options={"min_size": 64}',
                 "--set", "plots=false", "--set", "data.val_fraction=0.2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "test AP " in out and "on 4 images" in out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["monitor"] == "val_AP"


def test_a_coco_folder_trains_evaluates_and_detects_through_the_real_data_path(tmp_path, monkeypatch, capsys):
    """`cnnlab train --data coco:FILE`, `cnnlab eval RUN` and `cnnlab detect` with cnnlab.data.detection_data."""
    pytest.importorskip("cnnlab.data.detection_data")
    items = make_items(20, 11)  # the file order's split: index 4, 14 validation, 9, 19 test, the rest training
    write_coco(tmp_path, items)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", MODEL, "--data", "coco:annotations.json", "--epochs", "1", "--name", "coco",
                 "--quiet", "--device", "cpu", "--set", "data.batch_size=4", "--set", "optim.lr=0.01",
                 "--set", "plots=false"]) == 0
    results = json.loads((tmp_path / "runs" / "coco" / "results.json").read_text())
    assert [r["class"] for r in results["per_class"]] == CLASSES
    assert sum(r["gt"] for r in results["per_class"]) == sum(len(items[i][1]["boxes"]) for i in (9, 19))
    capsys.readouterr()
    assert main(["eval", "runs/coco", "--device", "cpu"]) == 0
    assert f"test AP {results['test_AP']:.4f}, AP50 {results['test_AP50']:.4f}" in capsys.readouterr().out
    assert main(["detect", "runs/coco", "images/09.png", "--out", "found", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "found" / "detections.json").read_text())["images"][0]["file"] == "images/09.png"
