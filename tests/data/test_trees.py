"""trees: the wheel download (served from a local fake wheel; never the network), reading from the zip,
tiling with the documented keep rule, and the real counts when the real wheel is cached."""
from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab.data.trees as trees
from cnnlab._errors import CnnlabError
from cnnlab.data.config import DataConfig
from cnnlab.data.detection_data import build_detection_data
from tests.data._annotated_files import voc_xml

# fake scenes: (width, height, VOC boxes 1-based inclusive)
TRAIN_BOXES = [(11, 11, 30, 30), (391, 51, 410, 70), (381, 101, 420, 120), (461, 201, 480, 220)]
VAL_BOXES = [(2, 2, 10, 12), (20, 5, 30, 15)]


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_fake_wheel(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, (w, h), boxes, seed in ((trees.TRAIN_IMAGE, (500, 300), TRAIN_BOXES, 0),
                                          (trees.VAL_IMAGE, (40, 30), VAL_BOXES, 1)):
            z.writestr(f"deepforest/data/{name}.png", png_bytes(w, h, seed))
            z.writestr(f"deepforest/data/{name}.xml", voc_xml(f"{name}.png", w, h, [("Tree", b, 0) for b in boxes]))
        z.writestr("deepforest/__init__.py", "raise ImportError('never imported')\n")
    return path


@pytest.fixture
def served(tmp_path, monkeypatch):
    """pip download replaced by a copy of a fake wheel; returns (cache root, list of download calls)."""
    source = write_fake_wheel(tmp_path / "pypi" / trees.WHEEL_NAME)
    calls = []

    def fake_download(dest: Path) -> None:
        calls.append(dest)
        shutil.copy(source, dest / trees.WHEEL_NAME)

    monkeypatch.setattr(trees, "_pip_download", fake_download)
    return tmp_path / "cache", calls


def test_wheel_is_downloaded_once_into_the_cache(served):
    root, calls = served
    path = trees.wheel_path(root)
    assert path == root / trees.WHEEL_NAME and path.is_file()
    assert trees.wheel_path(root) == path and len(calls) == 1
    assert [p.name for p in root.iterdir()] == [trees.WHEEL_NAME]  # the staging folder is gone


def test_offline_or_download_off_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(CnnlabError, match="downloading is off.*pip download deepforest==2.1.0 --no-deps"):
        trees.wheel_path(tmp_path, download=False)

    def offline(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0], stderr="ERROR: Could not find a version (network down)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(CnnlabError, match="could not download deepforest-2.1.0.*offline.*network down"):
        trees.wheel_path(tmp_path)
    assert not (tmp_path / trees.WHEEL_NAME).exists()


def test_scene_is_read_from_the_zip_with_zero_based_boxes(served):
    root, _ = served
    scene = trees.read_scene(trees.wheel_path(root), trees.VAL_IMAGE)
    assert scene.image.shape == (3, 30, 40) and scene.image.dtype == torch.uint8
    expected = np.array(Image.open(io.BytesIO(png_bytes(40, 30, 1)))).transpose(2, 0, 1)
    assert torch.equal(scene.image, torch.from_numpy(expected))
    assert scene.boxes.tolist() == [[1, 1, 10, 12], [19, 4, 30, 15]]  # VOC (xmin - 1, ymin - 1, xmax, ymax)


def test_tile_starts_cover_the_side_and_end_on_the_border():
    assert trees.tile_starts(2299, 400, 300) == [0, 300, 600, 900, 1200, 1500, 1800, 1899]
    assert trees.tile_starts(400, 400, 300) == [0]
    assert trees.tile_starts(300, 400, 300) == [0]
    assert trees.tile_starts(700, 400, 300) == [0, 300]


def test_tiles_clip_boxes_and_keep_those_mostly_inside(served):
    root, _ = served
    scene = trees.read_scene(trees.wheel_path(root), trees.TRAIN_IMAGE)  # 500 x 300: tiles x = 0 and 100
    tiles = trees.tile_scene(scene, tile=400, stride=300)
    assert len(tiles) == 2 and all(t[0].shape == (3, 300, 400) for t in tiles)
    assert torch.equal(tiles[1][0], scene.image[:, :, 100:500])
    # box 1 (390..410) is half in tile 0 (10 of 20 px: kept, clipped); box 2 (380..420) is 20 of 40 in tile 0
    # (kept); box 3 (460..480) is only in tile 1; in tile 1 (x from 100) box 0 (10..30) is out
    assert tiles[0][1].tolist() == [[10, 10, 30, 30], [390, 50, 400, 70], [380, 100, 400, 120]]
    assert tiles[1][1].tolist() == [[290, 50, 310, 70], [280, 100, 320, 120], [360, 200, 380, 220]]
    strict = trees.tile_scene(scene, tile=400, stride=300, min_visible=0.51)
    assert strict[0][1].tolist() == [[10, 10, 30, 30]]


def test_bundle_from_the_fake_wheel(served):
    root, _ = served
    b = build_detection_data(DataConfig(name="trees", root=str(root), batch_size=1, eval_batch_size=1,
                                        num_workers=0, flip=True), "cpu", seed=0)
    assert b.classes == ["tree"] and b.input_shape == (3, 300, 400)
    assert len(b.train) == 2 and len(b.val) == len(b.test) == 1
    images, targets = next(iter(b.val))
    assert images[0].shape == (3, 30, 40) and images[0].dtype == torch.float32 and float(images[0].max()) <= 1
    assert targets[0]["boxes"].tolist() == [[1, 1, 10, 12], [19, 4, 30, 15]]
    assert targets[0]["labels"].tolist() == [1, 1]
    seen = []
    for epoch in (0, 0, 1):
        b.train.set_epoch(epoch)
        seen.append([(t["image_id"], t["boxes"].tolist()) for _, ts in b.train for t in ts])
    assert seen[0] == seen[1]


def _real_wheel() -> Path | None:
    path = trees.trees_root() / trees.WHEEL_NAME
    return path if path.is_file() else None


@pytest.mark.skipif(_real_wheel() is None, reason="the deepforest 2.1.0 wheel is not cached (cnnlab downloads it)")
def test_real_wheel_counts():
    wheel = _real_wheel()
    train = trees.read_scene(wheel, trees.TRAIN_IMAGE)
    val = trees.read_scene(wheel, trees.VAL_IMAGE)
    assert len(train.boxes) == 574 and train.image.shape == (3, 2472, 2299)
    assert len(val.boxes) == 279 and val.image.shape == (3, 1035, 1249)
    tiles = trees.tile_scene(train)
    assert len(tiles) == 8 * 8  # 8 columns (2299 px: 0, 300, ..., 1800, 1899) x 8 rows (2472 px)
    assert sum(len(b) for _, b in tiles) >= 574  # overlapping tiles repeat border trees
