"""A detector trained by `cnnlab train` under torchrun: 2 CPU processes, one run folder, the global batch kept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.engine.test_detection_task import make_items


def write_coco(root: Path, items: list) -> None:
    """``items`` (image, target) as a COCO folder: ``root/annotations.json`` and ``root/images/NN.png``."""
    (root / "images").mkdir()
    images, annotations = [], []
    for i, (image, target) in enumerate(items):
        name = f"images/{i:02d}.png"
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(root / name)
        images.append({"id": i + 1, "file_name": name, "width": image.shape[2], "height": image.shape[1]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))


@pytest.mark.slow
def test_a_detector_trains_under_torchrun(tmp_path):
    write_coco(tmp_path, make_items(20, 11))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cnnlab.cli.main",
           "train", "--model", "faster_rcnn", "--data", "coco:annotations.json", "--epochs", "1", "--device", "cpu",
           "--out-dir", "out", "--name", "ddp", "--set", "data.batch_size=4", "--set", "plots=false",
           "--set", "model.options.backbone=simple_cnn_bn", "--set", "model.options.fpn=false",
           "--set", "model.options.min_size=64", "--set", "model.options.max_size=96",
           "--set", "model.options.anchor_sizes=[[16, 32, 64]]"]  # the objects are 10-28 px
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("parameters,") == 1  # only rank 0 logs
    # the file order's split keeps 16 of 20 images for training: 4 global steps of 4 (2 per rank), as one process
    assert "4 steps per epoch" in out
    assert out.count("test AP ") == 1
    run = tmp_path / "out" / "ddp"
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the header and one epoch, written once
    assert "test_AP" in json.loads((run / "results.json").read_text())
