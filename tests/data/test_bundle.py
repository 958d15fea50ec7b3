"""The data layer builds a run's batches: stratified train_limit, per-class folder splits, folder statistics."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab._errors import CnnlabError
from cnnlab.data import bundle as B
from cnnlab.data import datasets as D
from cnnlab.data.config import DataConfig
from cnnlab.data.folder import folder_splits


def _sorted_dataset(root=None, download=False) -> D.TensorDataset:
    """10 classes of 20 training images each, stored class by class (as mnist_5k and image folders are)."""
    labels = torch.arange(10).repeat_interleave(20)
    images = (labels * 25).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return D.TensorDataset("sorted", [str(i) for i in range(10)], images, labels, images[:10], labels[:10])


def test_train_limit_takes_every_class_at_random(monkeypatch):
    monkeypatch.setitem(D.DATASETS, "sorted", _sorted_dataset)
    data = B.build_data(DataConfig(name="sorted", train_limit=30, batch_size=8), torch.device("cpu"))
    labels = data.train.labels
    assert labels.bincount(minlength=10).tolist() == [3] * 10  # the first 30 would be 20 zeros and 10 ones
    # the images travel with their labels
    assert torch.equal(data.train.images[:, 0, 0, 0], (labels * 25).to(torch.uint8))
    # a fixed subset: another run seed trains on the same images
    other = B.build_data(DataConfig(name="sorted", train_limit=30, batch_size=8), torch.device("cpu"), seed=5)
    assert torch.equal(other.train.labels, labels)


def test_stratified_subset_keeps_the_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    idx = B.stratified_subset(labels, 10)
    assert labels[idx].bincount().tolist() == [5, 3, 2] and idx.tolist() == sorted(set(idx.tolist()))
    # 7 of 100: floors 3, 2, 1; the one left goes to the largest remainder (class 0's 0.5)
    assert labels[B.stratified_subset(labels, 7)].bincount().tolist() == [4, 2, 1]
    assert torch.equal(B.stratified_subset(labels, 10), idx)  # fixed seed
    assert not torch.equal(B.stratified_subset(labels, 10, seed=3), idx)  # a random pick within each class
    assert B.stratified_subset(labels, 500).tolist() == list(range(100))


def _folder(root, counts, size=(6, 6), values=None):
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            value = values[c] if values else (i * 37) % 256
            Image.fromarray(np.full((*size, 3), value, np.uint8)).save(root / c / f"{i:02d}.png")
    return root


def test_folder_split_is_per_class(tmp_path):
    # over the concatenated list (6 + 4 + 5 files) "every 5th" would give class b no test image at all
    root = _folder(tmp_path / "f", {"a": 6, "b": 4, "c": 5})
    classes, train, test, note = folder_splits(root)
    per_class = [sum(1 for _, label in test if label == k) for k in range(3)]
    assert per_class == [2, 1, 1] and len(train) == 15 - 4 and "each class" in note
    assert {p.name for p, label in test if label == 0} == {"00.png", "05.png"}
    assert not {p for p, _ in train} & {p for p, _ in test}


def test_folder_with_fewer_than_two_classes_is_refused(tmp_path):
    with pytest.raises(CnnlabError, match="at least 2 class sub-folders"):
        folder_splits(_folder(tmp_path / "one", {"cat": 10}))
    for part in ("train", "test"):
        _folder(tmp_path / "split" / part, {"cat": 3})
    with pytest.raises(CnnlabError, match="at least 2 class sub-folders"):
        folder_splits(tmp_path / "split")
    with pytest.raises(CnnlabError, match="holds 1 image; the automatic split needs at least 2 per class"):
        folder_splits(_folder(tmp_path / "small", {"cat": 4, "dog": 1}))


def test_folder_statistics_and_train_limit_sample_every_class(tmp_path, monkeypatch):
    # black cats, then white dogs: the first files alone would give a mean of 0
    root = _folder(tmp_path / "f", {"cat": 10, "dog": 10}, values={"cat": 0, "dog": 255})
    monkeypatch.setattr(B, "FOLDER_STATS_IMAGES", 4)
    read = []
    original = B.ImageFolder.__getitem__
    monkeypatch.setattr(B.ImageFolder, "__getitem__", lambda self, i: read.append(self.samples[i][1]) or original(self, i))
    data = B.build_data(DataConfig(name=str(root), batch_size=4, num_workers=0), torch.device("cpu"))
    assert sorted(read) == [0, 0, 1, 1]  # 4 images, 2 of each class
    assert data.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))
    limited = B.build_data(DataConfig(name=str(root), batch_size=4, num_workers=0, train_limit=6), torch.device("cpu"))
    assert sorted(label for _, label in limited.train.loader.dataset.samples) == [0, 0, 0, 1, 1, 1]


def test_batches_are_on_the_device_ready_for_the_model(monkeypatch):
    monkeypatch.setitem(D.DATASETS, "sorted", _sorted_dataset)
    data = B.build_data(DataConfig(name="sorted", batch_size=8, normalize="zca"), torch.device("cpu"))
    for batches in (data.train, data.test):
        assert isinstance(batches, B.DeviceBatches)
        x, y = next(iter(batches))
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == data.input_shape
    assert set(data.preprocess_tensors) == {"mean", "matrix"} and data.preprocess_state["kind"] == "zca"
    rebuilt = B.preprocess_from_state(data.preprocess_state, data.preprocess_tensors)
    x = torch.rand(3, *data.input_shape)
    assert torch.equal(rebuilt(x), data.preprocess(x))


def test_data_layer_imports_no_engine_and_old_imports_still_work():
    code = ("import sys, cnnlab.data, cnnlab.data.bundle; "
            "print([m for m in sys.modules if m.startswith(('cnnlab.engine', 'cnnlab.cli'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from cnnlab.engine import DataConfig as EngineDataConfig
    from cnnlab.engine.config import DataConfig as ConfigDataConfig
    from cnnlab.engine.data_setup import DataBundle, build_augment, build_data, preprocess_from_state, resize_images

    assert EngineDataConfig is ConfigDataConfig is DataConfig and build_data is B.build_data
    assert (DataBundle, build_augment, preprocess_from_state, resize_images) == (
        B.DataBundle, B.build_augment, B.preprocess_from_state, B.resize_images)
