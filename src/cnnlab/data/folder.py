"""Image folders with one sub-folder per class (torchvision's ImageFolder layout), read by DataLoader workers."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cnnlab._errors import CnnlabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def read_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """One image file -> uint8 (C, H, W), converted to ``channels`` (1 or 3) and resized to ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CnnlabError(f"cannot read image {path}: {e}") from None
    if channels not in (1, 3):
        raise CnnlabError(f"images can be read with 1 or 3 channels, not {channels}")
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


class ImageFolder(Dataset):
    """``root/<class>/<image>``; classes sorted by name, label = index.

    Args:
        root: the folder.
        channels: 1 (greyscale) or 3 (RGB).
        size: (H, W) every image is resized to; needed so images stack into batches.
        files: restrict to these (path, label) pairs (a split); default all.
    """

    def __init__(self, root: str | os.PathLike, channels: int, size: tuple[int, int],
                 files: Sequence[tuple[Path, int]] | None = None, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        self.channels, self.size = channels, size
        if files is None:
            classes, files = scan_folder(self.root)
        self.classes = classes or []
        self.samples = list(files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return read_image(path, self.channels, self.size), label


def scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sub-folder names, sorted) and every image file under them; errors name the folder."""
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise CnnlabError(f"image folder {root} {what}; expected a folder with one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CnnlabError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    files = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise CnnlabError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(p, label) for p in found]
    return classes, files


def folder_splits(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]], str]:
    """(classes, train files, test files, note): ``root/train`` + ``root/test`` (or ``val``) when present,
    else every 5th image of each class (its 1st, 6th, 11th... in name order) is test.

    The split is made per class, so every class has test images; fewer than 2 classes is refused
    (a one-class "classifier" scores 100% whatever it learns).
    """
    root = Path(root)
    for test_name in ("test", "val"):
        if (root / "train").is_dir() and (root / test_name).is_dir():
            classes, train = scan_folder(root / "train")
            test_classes, test = scan_folder(root / test_name)
            if test_classes != classes:
                raise CnnlabError(f"{root / test_name} has classes {test_classes}, {root / 'train'} has {classes}")
            _need_two_classes(root / "train", classes)
            return classes, train, test, f"folders train/ and {test_name}/"
    classes, files = scan_folder(root)
    _need_two_classes(root, classes)
    train, test = [], []
    for label, name in enumerate(classes):
        mine = [f for f in files if f[1] == label]  # scan_folder lists each class's files in name order
        if len(mine) < 2:
            raise CnnlabError(f"class folder {root / name} holds {len(mine)} image; the automatic split needs at "
                              f"least 2 per class (one for test), or give {root}/train/ and {root}/test/ folders")
        test += mine[::5]
        train += [f for i, f in enumerate(mine) if i % 5]
    return classes, train, test, "every 5th image of each class is test"


def _need_two_classes(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise CnnlabError(f"image folder {root} has {len(classes)} class ({', '.join(classes)}): a classifier needs "
                          f"at least 2 class sub-folders ({root}/<class>/<image>.png)")


def folder_loader(dataset: ImageFolder, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                  drop_last: bool = False) -> DataLoader:
    """A multi-worker DataLoader of uint8 batches; augmentation then runs batched on the device."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=gen,
                      drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
