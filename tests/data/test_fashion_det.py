"""fashion_det: the composer on synthetic items everywhere (boxes tight, overlap bounded, labels, masks), the
cache and determinism, and the real Fashion-MNIST composition where its files are present."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import cnnlab.data.datasets as D
from cnnlab._errors import CnnlabError
from cnnlab.data.fashion_det import FashionDet, FashionDetConfig, cache_path, compose, generate, load_fashion_det

SMALL = FashionDetConfig(canvas=64, train=60, val=20, test=30, min_scale=10, max_scale=32, max_iou=0.3)


def blobs(n: int, seed: int, value: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """28 x 28 items: a random ellipse each (or a constant full square of ``value``), random classes 0..9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    items = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        if value is not None:
            items[k] = value
            continue
        cy, cx, ry, rx = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 12), rng.uniform(3, 12)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        items[k][inside] = rng.integers(60, 256, size=int(inside.sum()))
    return items, rng.integers(0, 10, size=n)


def tight(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_composer_boxes_are_tight_overlap_bounded_and_labels_right():
    items, classes = blobs(400, 0)
    c = compose(items, classes, 100, SMALL, np.random.default_rng(1))
    assert len(c) == 100 and c.images.shape == (100, 64, 64)
    assert len(c.boxes) == len(c.labels) == int(c.offsets[-1]) > 100
    np.testing.assert_array_equal(c.labels, classes[c.source] + 1)  # label = the item's class + 1
    assert len(set(c.source.tolist())) == len(c.source)  # no item used twice
    for i in range(len(c)):
        sl = c.items(i)
        boxes = torch.from_numpy(c.boxes[sl])
        masks = c.instance_masks(i)
        assert len(masks) == len(boxes) <= SMALL.max_items
        for box, mask in zip(boxes.tolist(), masks):
            assert box == tight(mask)  # the box is the tight box of the item's pixels
            assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
        if len(boxes) > 1:
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= SMALL.max_iou + 1e-6
        # pixels: nonzero exactly on the union of the masks (all above the threshold), zero elsewhere
        union = masks.any(0) if len(masks) else np.zeros((64, 64), dtype=bool)
        assert (c.images[i][union] > SMALL.mask_threshold).all() and (c.images[i][~union] == 0).all()
        semantic = c.semantic_mask(i)
        assert ((semantic > 0) == union).all()
        if len(masks):  # the last item painted is on top where its mask is on
            assert (semantic[masks[-1].astype(bool)] == c.labels[sl][-1]).all()


def test_some_canvases_are_empty_and_counts_follow_the_config():
    items, classes = blobs(2000, 2)
    cfg = FashionDetConfig(canvas=64, min_scale=10, max_scale=20, empty_fraction=0.25, min_items=2, max_items=3)
    c = compose(items, classes, 400, cfg, np.random.default_rng(3))
    counts = np.diff(c.offsets)
    assert 60 <= int((counts == 0).sum()) <= 140  # 25 % of 400, binomial sd ~ 9
    assert set(counts.tolist()) <= {0, 2, 3}  # small items on a 64 px canvas always find a place


def test_items_scale_within_the_configured_range():
    items, classes = blobs(300, 4, value=200)  # full squares: the box is the whole resized item
    c = compose(items, classes, 100, SMALL, np.random.default_rng(5))
    sides = c.boxes[:, 2] - c.boxes[:, 0]
    np.testing.assert_array_equal(sides, c.boxes[:, 3] - c.boxes[:, 1])
    assert sides.min() >= SMALL.min_scale and sides.max() <= SMALL.max_scale
    assert len(np.unique(sides)) > 10  # different scales


def test_train_val_from_the_train_split_test_from_the_test_split_deterministically():
    train_x, train_y = blobs(300, 6, value=200)
    test_x, test_y = blobs(100, 7, value=100)
    a = generate(SMALL, train_x, train_y, test_x, test_y)
    b = generate(SMALL, train_x, train_y, test_x, test_y)
    for split in ("train", "val", "test"):
        for name in ("images", "boxes", "labels", "offsets", "masks"):
            assert getattr(a[split], name).tobytes() == getattr(b[split], name).tobytes()  # byte-identical
    assert [len(a[s]) for s in ("train", "val", "test")] == [60, 20, 30]
    assert set(np.unique(a["train"].images)) == {0, 200} and set(np.unique(a["val"].images)) == {0, 200}
    assert set(np.unique(a["test"].images)) == {0, 100}
    assert not set(a["train"].source.tolist()) & set(a["val"].source.tolist())  # val shares no source image
    np.testing.assert_array_equal(a["val"].labels, train_y[a["val"].source] + 1)
    np.testing.assert_array_equal(a["test"].labels, test_y[a["test"].source] + 1)
    other = generate(FashionDetConfig(**{**SMALL.__dict__, "seed": 1}), train_x, train_y, test_x, test_y)
    assert other["train"].images.tobytes() != a["train"].images.tobytes()


def test_cache_is_written_once_atomically_and_reloaded(tmp_path, monkeypatch):
    train_x, train_y = blobs(300, 8)
    test_x, test_y = blobs(100, 9)
    calls = []

    def fake_fashion_mnist(root=None, download=True):
        calls.append(1)
        return D.TensorDataset("fashion_mnist", D.FASHION_CLASSES, torch.from_numpy(train_x)[:, None],
                               torch.from_numpy(train_y), torch.from_numpy(test_x)[:, None], torch.from_numpy(test_y))

    monkeypatch.setattr(D, "fashion_mnist", fake_fashion_mnist)
    first = load_fashion_det(SMALL, root=tmp_path)
    assert cache_path(SMALL, tmp_path).is_file() and [p.name for p in tmp_path.iterdir()] == [
        cache_path(SMALL, tmp_path).name]  # no temporary file left
    second = load_fashion_det(SMALL, root=tmp_path)
    assert len(calls) == 1  # the second load reads the cache
    for split in first:
        assert first[split].images.tobytes() == second[split].images.tobytes()
        np.testing.assert_array_equal(first[split].mask_offsets, second[split].mask_offsets)
    assert cache_path(FashionDetConfig(seed=1), tmp_path) != cache_path(FashionDetConfig(), tmp_path)
    cache_path(SMALL, tmp_path).write_bytes(b"not a zip")
    with pytest.raises(CnnlabError, match="unreadable.*delete it"):
        load_fashion_det(SMALL, root=tmp_path)


def test_dataset_items_are_three_channel_with_matching_masks():
    items, classes = blobs(200, 10)
    c = compose(items, classes, 20, SMALL, np.random.default_rng(0))
    ds = FashionDet(c, masks=True)
    i = int(np.argmax(np.diff(c.offsets)))
    image, target = ds[i]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[2]) and torch.equal(image[0], torch.from_numpy(c.images[i]))
    assert target["masks"].shape == (len(target["boxes"]), 64, 64)
    assert target["labels"].dtype == torch.int64 and int(target["labels"].min()) >= 1


@pytest.mark.parametrize("bad", [dict(min_items=0), dict(max_scale=200), dict(max_iou=1.5), dict(canvas=-1),
                                 dict(empty_fraction=1.0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(CnnlabError, match="FashionDetConfig"):
        FashionDetConfig(**bad)


def _fashion_mnist_present() -> bool:
    cache = D.default_cache_dir() / "fashion_mnist" / "FashionMNIST" / "raw"
    system = D.SYSTEM_DIRS["fashion_mnist"]
    return all((cache / f).is_file() for f in D.IDX_FILES) or all((system / f"{f}.gz").is_file() for f in D.IDX_FILES)


@pytest.mark.skipif(not _fashion_mnist_present(), reason="real Fashion-MNIST not installed or cached")
def test_real_fashion_mnist_canvases(tmp_path):
    cfg = FashionDetConfig(train=300, val=50, test=100)
    splits = load_fashion_det(cfg, root=tmp_path, download=False)
    fm = D.fashion_mnist(download=False)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 50, 100]
    for split, labels in (("train", fm.train_labels), ("val", fm.train_labels), ("test", fm.test_labels)):
        c = splits[split]
        np.testing.assert_array_equal(c.labels, labels.numpy()[c.source] + 1)
        assert c.labels.min() >= 1 and c.labels.max() <= 10
        for i in range(0, len(c), 10):
            for box, mask in zip(c.boxes[c.items(i)].tolist(), c.instance_masks(i)):
                assert box == tight(mask)
    again = load_fashion_det(cfg, root=tmp_path / "other", download=False)
    assert again["test"].images.tobytes() == splits["test"].images.tobytes()
