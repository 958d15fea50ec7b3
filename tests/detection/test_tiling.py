"""Tiled inference: the windows' cores partition the image, each object comes back once and whole, a window as
large as the image is the plain forward pass, and ``data.eval_tile`` / ``cnnlab detect --tile`` use it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.detection.tiling import predict_tiled, tile_windows


@pytest.mark.parametrize("height, width, tile, overlap", [(1035, 1249, 400, 0.25), (400, 400, 400, 0.5),
                                                          (90, 300, 128, 0.0), (257, 129, 64, 0.3)])
def test_window_cores_partition_the_image(height, width, tile, overlap):
    windows = tile_windows(height, width, tile, overlap)
    owner = torch.zeros(height, width, dtype=torch.int64)
    ys, xs = torch.arange(height) + 0.5, torch.arange(width) + 0.5  # pixel centres
    for w in windows:
        assert 0 <= w["y"] and w["y"] + w["h"] <= height and 0 <= w["x"] and w["x"] + w["w"] <= width
        assert (w["h"], w["w"]) == (min(tile, height), min(tile, width))
        y0, y1, x0, x1 = w["core"]
        assert w["y"] <= y0 < y1 <= w["y"] + w["h"] and w["x"] <= x0 < x1 <= w["x"] + w["w"]  # inside its window
        owner += ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    assert torch.equal(owner, torch.ones_like(owner))  # every pixel in exactly one core
    starts = sorted({w["x"] for w in windows})
    step = tile - round(overlap * tile)
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))  # neighbours overlap at least overlap * tile


class TruthInWindows(nn.Module):
    """A stand-in detector that sees ``objects`` (image coordinates): in each window it reports every object that
    touches it, clipped to the window (as a real detector reports a cut object), scored by its index."""

    def __init__(self, objects: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        super().__init__()
        self.objects, self.origins, self.calls = objects, list(origins), 0
        self.eval()

    def forward(self, images):
        out = []
        for image in images:
            y, x = self.origins[self.calls]
            self.calls += 1
            h, w = image.shape[-2:]
            b = self.objects - torch.tensor([x, y, x, y], dtype=torch.float32)
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            seen = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            out.append({"boxes": b[seen], "labels": torch.ones(int(seen.sum()), dtype=torch.int64),
                        "scores": 1.0 - torch.arange(len(b))[seen].float() / 1000})
        return out


def test_each_object_comes_back_once_and_whole():
    gen = torch.Generator().manual_seed(0)
    height, width, tile, overlap = 700, 900, 256, 0.25  # overlap 64 px >= the largest object (60 px)
    xy = torch.rand(60, 2, generator=gen) * torch.tensor([width - 60.0, height - 60.0])
    wh = 10 + torch.rand(60, 2, generator=gen) * 50
    objects = torch.cat([xy, xy + wh], 1)
    windows = tile_windows(height, width, tile, overlap)
    model = TruthInWindows(objects, [(w["y"], w["x"]) for w in windows])
    found = predict_tiled(model, torch.zeros(3, height, width), tile, overlap, batch_size=3)
    assert model.calls == len(windows) > 1
    order = torch.argsort(found["scores"], descending=True)
    assert torch.equal(order, torch.arange(len(order)))  # sorted by score
    assert len(found["boxes"]) == len(objects)  # once each: the cut copies in other windows are left out
    by_index = torch.round((1.0 - found["scores"]) * 1000).long()
    assert torch.allclose(found["boxes"], objects[by_index], atol=1e-4)  # and whole


def test_nms_and_the_detection_cap_apply_after_merging():
    objects = torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0], [60.0, 5.0, 70.0, 15.0]])
    windows = tile_windows(40, 100, 64, 0.25)

    def run(**kwargs):
        model = TruthInWindows(objects, [(w["y"], w["x"]) for w in windows])
        return predict_tiled(model, torch.zeros(3, 40, 100), 64, 0.25, **kwargs)

    assert len(run()["boxes"]) == 3  # the core rule alone keeps the two overlapping boxes (real neighbours?)
    merged = run(nms_thresh=0.5)  # IoU 0.9: the lower-scored one goes
    assert merged["boxes"].tolist() == [objects[0].tolist(), objects[2].tolist()]
    assert run(detections_per_img=2)["scores"].tolist() == pytest.approx([1.0, 0.999])
    with pytest.raises(CnnlabError, match=r"nms_thresh must be an IoU in \(0, 1\]"):
        run(nms_thresh=0.0)


def test_a_window_as_large_as_the_image_is_the_plain_forward_pass():
    from cnnlab.models import create_model

    torch.manual_seed(0)
    model = create_model("faster_rcnn", backbone="resnet18", num_classes=3, fixed_scale=1.0,
                         box_score_thresh=0.0).eval()
    image = torch.rand(3, 96, 128)
    with torch.no_grad():
        plain = model([image])[0]
    tiled = predict_tiled(model, image, tile_size=128)
    assert len(plain["boxes"]) > 0
    order = torch.argsort(plain["scores"], descending=True, stable=True)
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(tiled[key], plain[key][order])


def test_bad_calls_are_clear_errors():
    model = TruthInWindows(torch.zeros(0, 4), [(0, 0)])
    with pytest.raises(CnnlabError, match=r"one \(C, H, W\) image"):
        predict_tiled(model, torch.zeros(1, 3, 8, 8), 8)
    with pytest.raises(CnnlabError, match="tile_size must be a positive number of pixels"):
        predict_tiled(model, torch.zeros(3, 8, 8), 0)
    with pytest.raises(CnnlabError, match=r"overlap must be a fraction of the window in \[0, 1\)"):
        predict_tiled(model, torch.zeros(3, 8, 8), 8, overlap=1.0)
    model.train()
    with pytest.raises(CnnlabError, match="eval mode"):
        predict_tiled(model, torch.zeros(3, 8, 8), 8)


def test_eval_tile_reaches_the_bundle_and_other_tasks_refuse_it(tmp_path):
    from cnnlab.data.bundle import build_data
    from cnnlab.data.config import DataConfig
    from cnnlab.data.detection_data import build_detection_data
    from cnnlab.data.segmentation_data import build_segmentation_data
    from tests.data.test_detection_data import _coco_many

    path = _coco_many(tmp_path, n=10)
    b = build_detection_data(DataConfig(name=f"coco:{path}", eval_tile=16, eval_tile_overlap=0.5, num_workers=0), "cpu")
    assert b.eval_tiles == (16, 0.5)
    assert build_detection_data(DataConfig(name=f"coco:{path}", num_workers=0), "cpu").eval_tiles is None
    with pytest.raises(CnnlabError, match=r"data\.eval_tile_overlap must be a fraction"):
        build_detection_data(DataConfig(name=f"coco:{path}", eval_tile=16, eval_tile_overlap=-0.1), "cpu")
    for builder, name in ((build_data, "digits"), (build_segmentation_data, "fashion_seg")):
        with pytest.raises(CnnlabError, match=r"data\.eval_tile=16 is tiled detection inference"):
            builder(DataConfig(name=name, eval_tile=16), "cpu")


def test_the_detection_task_evaluates_by_tiles_without_a_loss_pass():
    from dataclasses import replace

    from cnnlab.engine.tasks.detection import DetectionTask
    from tests.engine.test_detection_task import make_bundle, tiny_frcnn

    torch.manual_seed(0)
    model = tiny_frcnn().eval()
    data = make_bundle(n_train=2, n_val=2, n_test=3)
    whole = DetectionTask().evaluate(model, data.test, data)
    tiled = DetectionTask().evaluate(model, data.test, replace(data, eval_tiles=(32, 0.25)))
    assert np.isfinite(whole.loss) and np.isnan(tiled.loss)
    images = [im for ims, _ in data.test for im in ims]
    expected = [predict_tiled(model, im, 32, 0.25) for im in images]
    got = tiled.details["predictions"]
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert torch.equal(g["boxes"], e["boxes"]) and torch.equal(g["scores"], e["scores"])


def test_detect_cli_tiles_on_request(tmp_path):
    from cnnlab.cli.main import main
    from cnnlab.engine import train
    from tests.engine.test_detection_task import det_config, make_bundle, make_items

    train(det_config(tmp_path, "run", epochs=1), data=make_bundle(n_train=4, n_val=2, n_test=2))
    rgb = (make_items(1, 7)[0][0] * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(tmp_path / "canvas.png")
    base = ["detect", str(tmp_path / "run"), str(tmp_path / "canvas.png"), "--score-thresh", "0", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--tile", "32", "--tile-overlap", "0.5"]) == 0
    report = json.loads((tmp_path / "a" / "detections.json").read_text())
    assert report["tile"] == 32 and report["tile_overlap"] == 0.5
    from cnnlab.data.folder import read_image
    from cnnlab.engine.runs import load_run

    model = load_run(tmp_path / "run").model.eval()
    expected = predict_tiled(model, read_image(tmp_path / "canvas.png", 3, None).float() / 255, 32, 0.5)
    got = report["images"][0]["detections"]
    assert len(got) == len(expected["boxes"]) > 0
    assert [d["score"] for d in got] == pytest.approx(expected["scores"].tolist())
    assert main([*base, "--out", str(tmp_path / "b"), "--tile", "-3"]) == 2
    assert main([*base, "--out", str(tmp_path / "b"), "--tile", "32", "--tile-overlap", "1.5"]) == 2
    assert not (tmp_path / "b").exists()
