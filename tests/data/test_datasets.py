"""IDX/CIFAR readers, checksummed downloads and the named datasets, on small fake files (never the network)."""
from __future__ import annotations

import hashlib
import pickle
import tarfile
import io

import numpy as np
import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.data import datasets as D
from cnnlab.data.download import download
from cnnlab.data.idx import read_idx, write_idx


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_idx_mirror(tmp_path, n_train=12, n_test=5, size=6):
    """A folder laid out like the authors' server: four gzipped IDX files."""
    rng = np.random.default_rng(0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    arrays = [rng.integers(0, 256, (n_train, size, size), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, size, size), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)]
    for name, a in zip(D.IDX_FILES, arrays):
        write_idx(mirror / name, a)
    return mirror, arrays


def test_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / name, a)), a)


def test_idx_truncated_and_garbage_raise(tmp_path):
    path = write_idx(tmp_path / "a.idx", np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CnnlabError, match="truncated or corrupt"):
        read_idx(path)
    (tmp_path / "b.idx").write_bytes(b"hello world")
    with pytest.raises(CnnlabError, match="not an IDX file"):
        read_idx(tmp_path / "b.idx")


def test_fashion_mnist_downloads_checks_md5_and_caches(tmp_path, monkeypatch):
    mirror, arrays = _fake_idx_mirror(tmp_path)
    monkeypatch.setattr(D, "SYSTEM_DIRS", {})  # never look at the Debian package in tests
    monkeypatch.setattr(D, "FASHION_MNIST_URLS", (str(mirror) + "/",))
    monkeypatch.setattr(D, "FASHION_MNIST_MD5", {f: _md5(mirror / f) for f in D.IDX_FILES})
    cache = tmp_path / "cache"
    data = D.fashion_mnist(root=cache)
    assert data.train_images.shape == (12, 1, 6, 6) and data.train_images.dtype == torch.uint8
    np.testing.assert_array_equal(data.test_labels.numpy(), arrays[3])
    assert data.classes[9] == "Ankle boot" and all((cache / f).is_file() for f in D.IDX_FILES)
    (mirror / D.IDX_FILES[0]).unlink()  # second call reads the cache, not the mirror
    assert D.fashion_mnist(root=cache).train_images.shape[0] == 12


def test_download_rejects_bad_checksum_and_leaves_nothing(tmp_path):
    src = tmp_path / "file.bin"
    src.write_bytes(b"abc")
    with pytest.raises(CnnlabError, match="checksum mismatch"):
        download(str(src), tmp_path / "out" / "file.bin", md5="0" * 32)
    assert list((tmp_path / "out").iterdir()) == []
    assert download(str(src), tmp_path / "out" / "file.bin", md5=_md5(src)).read_bytes() == b"abc"


def test_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DIRS", {})
    with pytest.raises(CnnlabError, match="downloading is off"):
        D.mnist(root=tmp_path, download=False)


def _fake_cifar(path, n_per_batch=3):
    rng = np.random.default_rng(1)
    buf = tarfile.open(path, "w:gz")

    def add(name, obj):
        data = pickle.dumps(obj)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        buf.addfile(info, io.BytesIO(data))

    for i in range(1, 6):
        add(f"cifar-10-batches-py/data_batch_{i}", {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                                    b"labels": [i % 10] * n_per_batch})
    add("cifar-10-batches-py/test_batch", {b"data": np.full((2, 3072), 7, np.uint8), b"labels": [3, 4]})
    add("cifar-10-batches-py/batches.meta", {b"label_names": [c.encode() for c in D.CIFAR10_CLASSES]})
    buf.close()


def test_cifar10_fake_archive_with_checksum(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _fake_cifar(mirror / "cifar-10-python.tar.gz")
    monkeypatch.setattr(D, "CIFAR10", ("cifar-10-python.tar.gz", _md5(mirror / "cifar-10-python.tar.gz"), str(mirror) + "/"))
    data = D.cifar10(root=tmp_path / "cache")
    assert data.train_images.shape == (15, 3, 32, 32) and data.test_labels.tolist() == [3, 4]
    assert data.classes[0] == "airplane" and int(data.test_images[0, 2, 31, 31]) == 7


def test_corrupt_cifar_archive_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(CnnlabError, match="not a readable CIFAR archive"):
        D.cifar10(root=tmp_path, download=False)


def test_bundled_datasets_fixed_splits():
    digits = D.digits()
    assert (len(digits.train_images), len(digits.test_images)) == (1437, 360)
    m = D.mnist_5k()
    assert (len(m.train_images), len(m.test_images)) == (4000, 1000)
    assert m.test_labels.bincount().tolist() == [100] * 10  # every 5th image of a label-sorted file


def test_unknown_dataset_suggests():
    with pytest.raises(CnnlabError, match="did you mean fashion_mnist"):
        D.load_dataset("fashion_mnsit")


def test_cifar100_fake_archive_fine_labels(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    path = mirror / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in (("cifar-100-python/train", {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 99, 5]}),
                          ("cifar-100-python/test", {b"data": np.ones((2, 3072), np.uint8), b"fine_labels": [7, 8]}),
                          ("cifar-100-python/meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(D, "CIFAR100", ("cifar-100-python.tar.gz", _md5(path), str(mirror) + "/"))
    data = D.cifar100(root=tmp_path / "cache")
    assert data.name == "cifar100" and data.num_classes == 100 and data.train_labels.tolist() == [0, 1, 99, 5]
    monkeypatch.setattr(D, "CIFAR100", ("cifar-100-python.tar.gz", "f" * 32, str(mirror) + "/"))
    with pytest.raises(CnnlabError, match="checksum mismatch"):
        D.cifar100(root=tmp_path / "other")
