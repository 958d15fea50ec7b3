"""Normalisation and PCA whitening fitted on training images; image folders and their errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab._errors import CnnlabError
from cnnlab.data.folder import ImageFolder, folder_loader, folder_splits, read_image
from cnnlab.data.loader import TensorLoader
from cnnlab.data.preprocess import Normalize, PCAWhiten


def test_normalize_fit_gives_zero_mean_unit_std():
    images = torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 1] //= 4  # channels with different statistics
    norm = Normalize.fit(images, chunk=7)
    x = norm(images.float() / 255)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    with pytest.raises(CnnlabError, match="3 channels"):
        norm(torch.zeros(1, 1, 6, 6))


@pytest.mark.parametrize("zca", [False, True])
def test_pca_whitening_decorrelates(zca):
    g = torch.Generator().manual_seed(1)
    base = torch.rand(2000, 1, 4, 4, generator=g)
    mixed = (base + base.roll(1, dims=3) * 0.8) / 1.8  # correlated neighbouring pixels
    images = (mixed * 255).round().to(torch.uint8)
    whiten = PCAWhiten.fit(images, eps=1e-6, zca=zca)
    z = whiten(images.float() / 255).flatten(1)
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(16), atol=2e-2)
    if zca:  # ZCA stays close to the input image (it is the whitening nearest to the identity)
        assert torch.corrcoef(torch.stack([z[:, 5], images.flatten(1)[:, 5].float()]))[0, 1] > 0.5


def test_tensor_loader_epochs_repeat_and_differ():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    loader = TensorLoader(x, torch.arange(10), 4, shuffle=True, seed=3)
    order = lambda: torch.cat([y for _, y in loader]).tolist()  # noqa: E731
    first = order()
    assert sorted(first) == list(range(10)) and order() == first
    loader.set_epoch(1)
    assert order() != first
    assert len(TensorLoader(x, torch.arange(10), 4, drop_last=True)) == 2


def _folder(tmp_path, per_class=5, size=(10, 12)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    return tmp_path


def test_image_folder_through_dataloader_workers(tmp_path):
    root = _folder(tmp_path / "imgs")
    classes, train, test, note = folder_splits(root)
    assert classes == ["cat", "dog"] and len(train) == 8 and len(test) == 2 and "every 5th" in note
    ds = ImageFolder(root, channels=1, size=(8, 8), files=train, classes=classes)
    batches = list(folder_loader(ds, 4, shuffle=True, num_workers=2, seed=0))
    assert [b[0].shape for b in batches] == [(4, 1, 8, 8)] * 2 and batches[0][0].dtype == torch.uint8
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 4 + [1] * 4


def test_folder_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnlabError, match="no class sub-folders"):
        folder_splits(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(CnnlabError, match="holds no images"):
        folder_splits(tmp_path / "noimg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(CnnlabError, match="bad.png"):
        read_image(bad, 1, None)
    with pytest.raises(CnnlabError, match="does not exist"):
        folder_splits(tmp_path / "missing")


def test_image_size_resizes_a_named_dataset_once(monkeypatch):
    from cnnlab.engine.config import DataConfig
    from cnnlab.engine.data_setup import build_data, resize_images
    from tests.engine._tiny import register_tiny

    register_tiny(monkeypatch)
    data = build_data(DataConfig(name="tiny", image_size=20, batch_size=16), torch.device("cpu"))
    x, _ = next(iter(data.train))
    assert data.input_shape == (1, 20, 20) and x.shape[-2:] == (20, 20) and data.test_images.shape[-2:] == (20, 20)
    # the same as resizing each image on its own (torchvision's antialiased bilinear), to rounding
    from torchvision.transforms.functional import InterpolationMode, resize

    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    ours = resize_images(images, 20, chunk=2)
    ref = torch.stack([resize(img, [20, 20], InterpolationMode.BILINEAR, antialias=True) for img in images])
    assert ours.dtype == torch.uint8 and (ours.int() - ref.int()).abs().max() <= 1
