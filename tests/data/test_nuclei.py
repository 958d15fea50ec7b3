"""nuclei: the wheel download (a fake wheel with two small TIFFs written by tifffile; never the network), reading
the TIFFs from the zip, the quadrant split (no training or validation pixel in the test quadrant, no validation
pixel in a training tile), and the bundle's tensors and normalisation; the real image when its wheel is cached."""
from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import cnnlab.data.nuclei as N
from cnnlab._errors import CnnlabError
from cnnlab.data.config import DataConfig
from cnnlab.data.segmentation_data import build_segmentation_data

WHEEL = "stardist-0.9.2-cp311-cp311-manylinux_2_28_x86_64.whl"
SIZE = 64  # fake image: 64 x 64, quadrants of 32


def fake_arrays(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint16 intensities within 0..255 (as the real file) and an instance mask of square nuclei (ids 1..)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 120, (size, size)).astype(np.uint16)
    instances = np.zeros((size, size), dtype=np.uint16)
    for k, (r, c) in enumerate([(r, c) for r in range(2, size - 6, 9) for c in range(3, size - 6, 11)], start=1):
        instances[r:r + 5, c:c + 6] = k
        image[r:r + 5, c:c + 6] += 100
    return image, instances


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def write_fake_wheel(path: Path, image: np.ndarray | None = None, instances: np.ndarray | None = None) -> Path:
    default_image, default_instances = fake_arrays()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(N.IMAGE_MEMBER, tiff_bytes(default_image if image is None else image))
        z.writestr(N.MASK_MEMBER, tiff_bytes(default_instances if instances is None else instances))
        z.writestr("stardist/__init__.py", "raise ImportError('never imported')\n")
    return path


@pytest.fixture
def served(tmp_path, monkeypatch):
    """pip download replaced by a copy of a fake wheel; returns (cache root, list of download calls)."""
    source = write_fake_wheel(tmp_path / "pypi" / WHEEL)
    calls = []

    def fake_download(dest: Path) -> None:
        calls.append(dest)
        shutil.copy(source, dest / WHEEL)

    monkeypatch.setattr(N, "_pip_download", fake_download)
    return tmp_path / "cache", calls


def test_wheel_is_downloaded_once_into_the_cache(served):
    root, calls = served
    path = N.wheel_path(root)
    assert path == root / WHEEL and path.is_file()
    assert N.wheel_path(root) == path and len(calls) == 1
    assert [p.name for p in root.iterdir()] == [WHEEL]  # the staging folder is gone


def test_offline_or_download_off_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(CnnlabError, match=r"downloading is off.*pip download stardist==0\.9\.2 --no-deps"):
        N.wheel_path(tmp_path, download=False)
    seen = []

    def offline(cmd, **kwargs):
        seen.append(cmd)
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution (network down)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(CnnlabError, match=r"could not download stardist 0\.9\.2.*offline.*network down"):
        N.wheel_path(tmp_path)
    assert "stardist==0.9.2" in seen[0] and "--no-deps" in seen[0]
    assert not list(tmp_path.glob("stardist-*"))


def test_tiffs_are_read_from_the_zip_as_foreground(served):
    root, _ = served
    image, fg = N.read_nuclei(N.wheel_path(root))
    expected_image, instances = fake_arrays()
    assert image.dtype == np.uint8 and np.array_equal(image, expected_image)  # 0..255 integers kept as they are
    assert fg.dtype == np.uint8 and np.array_equal(fg, (instances > 0).astype(np.uint8))


def test_intensities_outside_a_byte_are_scaled_linearly():
    np.testing.assert_array_equal(N.to_uint8(np.array([[100, 300], [1100, 600]], dtype=np.uint16)),
                                  [[0, 51], [255, 128]])  # (v - 100) * 255 / 1000, rounded
    np.testing.assert_array_equal(N.to_uint8(np.array([0.0, 0.5, 1.0])), [0, 128, 255])
    with pytest.raises(CnnlabError, match="NaN"):
        N.to_uint8(np.array([0.0, np.nan]))


def test_bad_wheels_name_the_member(tmp_path):
    image, instances = fake_arrays()
    wrong = write_fake_wheel(tmp_path / "a" / WHEEL, instances=instances[:, :40])
    with pytest.raises(CnnlabError, match=r"mask2d\.tif is 40x64 but .*img2d\.tif is 64x64"):
        N.read_nuclei(wrong)
    empty = tmp_path / "b" / WHEEL
    empty.parent.mkdir()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr(N.IMAGE_MEMBER, tiff_bytes(image))
    with pytest.raises(CnnlabError, match=r"has no stardist/data/images/mask2d\.tif"):
        N.read_nuclei(empty)
    (tmp_path / "c.whl").write_bytes(b"not a zip")
    with pytest.raises(CnnlabError, match="not a readable wheel"):
        N.read_nuclei(tmp_path / "c.whl")


def test_quadrant_split_keeps_the_test_quadrant_and_val_strips_apart():
    image, instances = fake_arrays()
    fg = (instances > 0).astype(np.uint8)
    s = N.split_nuclei(N.to_uint8(image), fg, tile=16, stride=8, val_fraction=0.25)  # val: bottom 8 rows
    # train: rows 0..23 of each 32 x 32 training quadrant -> row starts 0, 8 and columns 0, 8, 16: 2 x 3 x 3 tiles
    assert s.train_images.shape == (18, 1, 16, 16) and s.train_masks.shape == (18, 16, 16)
    assert s.test_images.shape == (1, 1, 32, 32) and s.val_images.shape == (3, 1, 8, 32)
    bounds = N.quadrant_bounds(SIZE, SIZE)
    assert N.TEST_QUADRANT == "bottom_right" and bounds["bottom_right"] == (32, 64, 32, 64)
    val_rows = {"top_left": (24, 32, 0, 32), "top_right": (24, 32, 32, 64), "bottom_left": (56, 64, 0, 32)}
    covered = np.zeros((SIZE, SIZE), dtype=bool)
    for k, (y, x) in enumerate(s.train_origins):
        assert torch.equal(s.train_images[k, 0], torch.from_numpy(N.to_uint8(image)[y:y + 16, x:x + 16]))
        assert torch.equal(s.train_masks[k], torch.from_numpy(fg[y:y + 16, x:x + 16]))
        covered[y:y + 16, x:x + 16] = True
    r0, r1, c0, c1 = bounds["bottom_right"]
    assert not covered[r0:r1, c0:c1].any()  # no training tile touches the test quadrant
    for r0_, r1_, c0_, c1_ in val_rows.values():
        assert not covered[r0_:r1_, c0_:c1_].any()  # nor a validation strip
    assert covered.sum() == 3 * 24 * 32  # and the tiles cover every other training pixel
    assert torch.equal(s.test_images[0, 0], torch.from_numpy(N.to_uint8(image)[32:, 32:]))
    assert torch.equal(s.val_images[2, 0], torch.from_numpy(N.to_uint8(image)[56:64, 0:32]))
    assert torch.equal(s.fit_images[1, 0], torch.from_numpy(N.to_uint8(image)[0:24, 32:64]))
    with pytest.raises(CnnlabError, match="a 32 px tile does not fit the 24 x 32 training part"):
        N.split_nuclei(image.astype(np.uint8), fg, tile=32, stride=8, val_fraction=0.25)


def test_nuclei_bundle(served):
    root, _ = served
    config = DataConfig(name="nuclei", root=str(root), image_size=16, batch_size=8, eval_batch_size=4, flip=True,
                        vflip=True, val_fraction=0.25, num_workers=0)
    b = build_segmentation_data(config, "cpu", seed=1)
    assert b.classes == ["background", "nucleus"] and b.input_shape == (1, 16, 16) and b.ignore_index == 255
    image, instances = fake_arrays()
    image = image.astype(np.float64) / 255
    train_pixels = np.concatenate([image[0:24, 0:32], image[0:24, 32:64], image[32:56, 0:32]])
    np.testing.assert_allclose(b.preprocess_state["mean"], [train_pixels.mean()], rtol=1e-9)
    np.testing.assert_allclose(b.preprocess_state["std"], [train_pixels.std()], rtol=1e-9)
    # 16 px tiles every 4 px (stride = tile / 4) over the 24 x 32 training parts: 3 quadrants x 3 rows x 5 columns
    assert len(b.train.images) == 45 and len(b.train) == 5  # batches of 8, the last partial one dropped
    for x, m in b.train:
        assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32 and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 1}
    (x, m), = list(b.test)
    assert x.shape == (1, 1, 32, 32) and torch.equal(m[0], torch.from_numpy((instances[32:, 32:] > 0)).long())
    mean, std = b.preprocess_state["mean"][0], b.preprocess_state["std"][0]
    torch.testing.assert_close(x[0, 0].double() * std + mean, torch.from_numpy(image[32:, 32:]), atol=1e-6, rtol=0)
    assert torch.equal(b.test_images, b.test.images.cpu()) and b.test_images.dtype == torch.uint8
    (xv, mv), = list(b.val)
    assert xv.shape == (3, 1, 8, 32)
    no_val = build_segmentation_data(DataConfig(name="nuclei", root=str(root), image_size=16, train_limit=10), "cpu")
    assert no_val.val is None and len(no_val.train.images) == 10


def _real_wheel() -> Path | None:
    try:
        return N.wheel_path(download=False)
    except CnnlabError:
        return None


@pytest.mark.skipif(_real_wheel() is None, reason="the stardist wheel is not cached (cnnlab never downloads in tests)")
def test_real_nuclei_image():
    image, fg = N.read_nuclei(_real_wheel())
    assert image.shape == fg.shape == (512, 512) and image.max() == 235  # the file's own range, kept as is
    assert abs(fg.mean() - 0.1992) < 1e-4  # 52,225 of 262,144 pixels are nuclei (measured, docs/data_segmentation.md)
    s = N.split_nuclei(image, fg)
    assert s.train_images.shape == (75, 1, 128, 128) and s.test_images.shape == (1, 1, 256, 256)
