"""The named datasets through torchvision's readers, on small fake files in its layouts (never the network)."""
from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
import torch

from cnnlab._errors import CnnlabError
from cnnlab.data import datasets as D
from tests.data._fakes import cifar_archive, idx_arrays, serve_folder, write_idx


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_system_folder(monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DIRS", {})  # never look at the Debian package in tests


def _check(data, arrays):
    """The tensors are the arrays written: (N, 1, H, W) uint8 images and int64 labels."""
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    for got, want in zip((data.train_images[:, 0], data.train_labels, data.test_images[:, 0], data.test_labels), arrays):
        np.testing.assert_array_equal(got.numpy(), want)


def test_reads_torchvisions_layout(tmp_path):
    arrays = idx_arrays()
    for name, a in zip(D.IDX_FILES, arrays):
        write_idx(tmp_path / "MNIST" / "raw" / name, a)
    data = D.mnist(root=tmp_path, download=False)
    _check(data, arrays)
    assert data.classes == [str(i) for i in range(10)] and data.input_shape == (1, 6, 6)


def test_system_folder_of_gzipped_files_is_decompressed_into_the_cache(tmp_path, monkeypatch):
    arrays = idx_arrays(seed=1)
    system = tmp_path / "usr-share"
    for name, a in zip(D.IDX_FILES, arrays):
        write_idx(system / f"{name}.gz", a)
    monkeypatch.setattr(D, "SYSTEM_DIRS", {"fashion_mnist": system})
    cache = tmp_path / "cache"
    data = D.fashion_mnist(root=cache, download=False)
    _check(data, arrays)
    assert data.classes[9] == "Ankle boot"
    assert sorted(p.name for p in (cache / "FashionMNIST" / "raw").iterdir()) == sorted(D.IDX_FILES)
    assert not any(p.name.startswith(".staging") for p in cache.iterdir())
    for f in system.iterdir():  # the second load reads the cache alone
        f.unlink()
    _check(D.fashion_mnist(root=cache, download=False), arrays)


@pytest.fixture
def mirror(tmp_path):
    """A fake mirror: tmp_path/mirror served over HTTP on the loopback interface."""
    (tmp_path / "mirror").mkdir()
    with serve_folder(tmp_path / "mirror") as url:
        yield tmp_path / "mirror", url


def test_downloads_through_torchvision_with_md5_and_mirrors(tmp_path, monkeypatch, mirror):
    arrays = idx_arrays(seed=2)
    mirror, url = mirror
    for name, a in zip(D.IDX_FILES, arrays):
        write_idx(mirror / f"{name}.gz", a)
    # the first mirror lacks the files (404): torchvision tries the next
    monkeypatch.setattr(D._FashionMNIST, "mirrors", [url + "missing/", url])
    monkeypatch.setattr(D._FashionMNIST, "resources", [(f"{n}.gz", _md5(mirror / f"{n}.gz")) for n in D.IDX_FILES])
    cache = tmp_path / "cache"
    _check(D.fashion_mnist(root=cache), arrays)
    assert sorted(p.name for p in (cache / "FashionMNIST" / "raw").iterdir()) == sorted(D.IDX_FILES)
    # a wrong checksum is refused and leaves nothing that looks like a dataset
    monkeypatch.setattr(D._FashionMNIST, "resources", [(f"{n}.gz", "0" * 32) for n in D.IDX_FILES])
    with pytest.raises(CnnlabError, match="could not download FashionMNIST"):
        D.fashion_mnist(root=tmp_path / "other")
    assert not (tmp_path / "other" / "FashionMNIST").exists()


def test_missing_files_without_download(tmp_path):
    with pytest.raises(CnnlabError, match="downloading is off"):
        D.mnist(root=tmp_path, download=False)


def test_truncated_file_is_a_clear_error(tmp_path):
    paths = [write_idx(tmp_path / "MNIST" / "raw" / name, a) for name, a in zip(D.IDX_FILES, idx_arrays())]
    paths[0].write_bytes(paths[0].read_bytes()[:-7])
    with pytest.raises(CnnlabError, match="corrupt or truncated"):
        D.mnist(root=tmp_path, download=False)
    paths[0].write_bytes(b"hello world")
    with pytest.raises(CnnlabError, match="corrupt or truncated"):
        D.mnist(root=tmp_path, download=False)


def _cifar10_members(rng):
    batches = {f"cifar-10-batches-py/data_batch_{i}": {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                                       "labels": [i % 10] * 3} for i in range(1, 6)}
    batches["cifar-10-batches-py/test_batch"] = {"data": np.full((2, 3072), 7, np.uint8), "labels": [3, 4]}
    batches["cifar-10-batches-py/batches.meta"] = {"label_names": D.CIFAR10_CLASSES}
    return batches


def _trust_fake_cifar(monkeypatch, cls, archive, url):
    """Point cnnlab's CIFAR class at the fake archive: its URL and the md5 of each member."""
    monkeypatch.setattr(cls, "url", url + archive.name)
    monkeypatch.setattr(cls, "tgz_md5", _md5(archive))
    with tarfile.open(archive) as tar:
        sums = {m.name.split("/")[-1]: hashlib.md5(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}
    monkeypatch.setattr(cls, "train_list", [[f, sums[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, sums[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=sums[cls.meta["filename"]]))


def test_cifar10_downloads_checks_and_extracts(tmp_path, monkeypatch, mirror):
    members = _cifar10_members(np.random.default_rng(1))
    archive = cifar_archive(mirror[0] / "cifar-10-python.tar.gz", members)
    _trust_fake_cifar(monkeypatch, D._CIFAR10, archive, mirror[1])
    data = D.cifar10(root=tmp_path / "cache")
    assert data.train_images.shape == (15, 3, 32, 32) and data.test_labels.tolist() == [3, 4]
    assert data.classes == D.CIFAR10_CLASSES and int(data.test_images[0, 2, 31, 31]) == 7
    # the authors' row layout: 1024 red, then green, then blue values, each row-major (32, 32)
    first = members["cifar-10-batches-py/data_batch_1"]["data"][0]
    np.testing.assert_array_equal(data.train_images[0].numpy(), first.reshape(3, 32, 32))
    archive.unlink()  # the second load reads the extracted batches
    assert torch.equal(D.cifar10(root=tmp_path / "cache", download=False).train_images, data.train_images)


def test_corrupt_cifar_archive_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(CnnlabError, match="checksum mismatch"):
        D.cifar10(root=tmp_path, download=False)
    with pytest.raises(CnnlabError, match="downloading is off"):
        D.cifar10(root=tmp_path / "empty", download=False)


def test_cifar100_fake_archive_fine_labels(tmp_path, monkeypatch, mirror):
    archive = cifar_archive(mirror[0] / "cifar-100-python.tar.gz", {
        "cifar-100-python/train": {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 99, 5]},
        "cifar-100-python/test": {"data": np.ones((2, 3072), np.uint8), "fine_labels": [7, 8]},
        "cifar-100-python/meta": {"fine_label_names": [f"c{i}" for i in range(100)]}})
    _trust_fake_cifar(monkeypatch, D._CIFAR100, archive, mirror[1])
    data = D.cifar100(root=tmp_path / "cache")
    assert data.name == "cifar100" and data.num_classes == 100 and data.train_labels.tolist() == [0, 1, 99, 5]
    monkeypatch.setattr(D._CIFAR100, "tgz_md5", "f" * 32)
    with pytest.raises(CnnlabError, match="could not download"):
        D.cifar100(root=tmp_path / "other")
    assert not (tmp_path / "other" / "cifar-100-python").exists()


def test_bundled_datasets_fixed_splits():
    digits = D.digits()
    assert (len(digits.train_images), len(digits.test_images)) == (1437, 360)
    m = D.mnist_5k()
    assert (len(m.train_images), len(m.test_images)) == (4000, 1000)
    assert m.test_labels.bincount().tolist() == [100] * 10  # every 5th image of a label-sorted file


def test_unknown_dataset_suggests():
    with pytest.raises(CnnlabError, match="did you mean fashion_mnist"):
        D.load_dataset("fashion_mnsit")
