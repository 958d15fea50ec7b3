"""From a DataConfig to loaders: dataset, split, preprocessing fitted on the training images, augmentation."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError
from cnnlab.data import augment as A
from cnnlab.data.datasets import DATASETS, TensorDataset, load_dataset
from cnnlab.data.folder import ImageFolder, folder_loader, folder_splits, read_image
from cnnlab.data.loader import TensorLoader, prepare_batch
from cnnlab.data.preprocess import Normalize, PCAWhiten
from cnnlab.engine.config import DataConfig

# datasets whose classes change under vertical flips and large rotations (digits: 6 <-> 9)
ORIENTATION_SENSITIVE = {"mnist", "digits", "mnist_5k"}


@dataclass
class DataBundle:
    """Loaders and what evaluation and prediction need to know about the data.

    Args:
        train, val, test: iterables of (x, y) batches on the device; val is None without a split.
        classes: class names; input_shape: (C, H, W) of the model input.
        preprocess: the fitted normalisation (also applied by ``cnnlab predict``).
        preprocess_state: JSON-able description of it, saved with the run.
    """

    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]] | None
    test: Iterable[tuple[torch.Tensor, torch.Tensor]]
    classes: list[str]
    input_shape: tuple[int, int, int]
    preprocess: Any
    preprocess_state: dict[str, Any]
    test_images: torch.Tensor | None = None  # uint8, for the misclassified-examples grid

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_augment(config: DataConfig, num_classes: int, dataset: str) -> A.BatchTransform | None:
    """The configured augmentations, in a fixed order (geometry, photometric, occlusion, label mixing)."""
    t: list[A.BatchTransform] = []
    if config.flip:
        t.append(A.RandomFlip())
    if config.vflip:
        t.append(A.RandomFlip(vertical=True))
    if config.crop_padding:
        t.append(A.RandomCrop(config.crop_padding))
    if config.resized_crop_scale:
        t.append(A.RandomResizedCrop(scale=(config.resized_crop_scale, 1.0)))
    if config.rotate or config.translate or config.shear or tuple(config.scale) != (1.0, 1.0):
        t.append(A.RandomAffine(config.rotate, config.translate, tuple(config.scale), config.shear))
    if config.jitter or config.hue:
        t.append(A.ColorJitter(config.jitter, config.jitter, config.jitter, config.hue))
    if config.cutout:
        t.append(A.Cutout(config.cutout))
    if config.mixup and config.cutmix:
        raise CnnlabError("data.mixup and data.cutmix are exclusive: pick one")
    if config.mixup:
        t.append(A.Mixup(num_classes, config.mixup))
    if config.cutmix:
        t.append(A.CutMix(num_classes, config.cutmix))
    if not t:
        return None
    compose = A.Compose(t)
    A.warn_label_changes(compose, dataset, dataset in ORIENTATION_SENSITIVE)
    return compose


def _fit_preprocess(kind: str, images: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    norm = Normalize.fit(images)
    state: dict[str, Any] = {"kind": kind, "mean": list(norm.mean), "std": list(norm.std)}
    if kind == "standard":
        return norm, state
    if kind == "none":
        return None, {"kind": "none"}
    whiten = PCAWhiten.fit(images, zca=kind == "zca")
    return whiten, {"kind": kind}  # the matrix is stored with the checkpoint, not in JSON


def preprocess_from_state(state: dict[str, Any]) -> Any:
    if state.get("kind") == "standard":
        return Normalize(tuple(state["mean"]), tuple(state["std"]))
    if state.get("kind") in (None, "none"):
        return None
    raise CnnlabError(f"preprocessing {state['kind']!r} cannot be rebuilt from the run folder; use 'standard' for predict")


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing, once before training.

    Done a chunk at a time so that only the result, never a float copy of the whole set, is held.
    """
    if size < 1:
        raise CnnlabError(f"data.image_size must be a positive size in pixels, got {size}")
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float()
        out[start:start + chunk] = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                 align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return out


def split_validation(images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int):
    """Hold out ``fraction`` of the training split, chosen by a permutation fixed by ``seed``."""
    n_val = int(round(len(images) * fraction))
    if fraction and (n_val == 0 or n_val == len(images)):
        raise CnnlabError(f"data.val_fraction={fraction} leaves an empty split of {len(images)} images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return (images[train], labels[train]), (images[val], labels[val])


def build_data(config: DataConfig, device: torch.device, *, seed: int = 0, channels_last: bool = False,
               in_channels: int | None = None) -> DataBundle:
    """Load the dataset named in ``config`` (or an image folder) and wrap it in device loaders."""
    if config.name not in DATASETS and (Path(config.name).is_dir() or "/" in config.name):
        return _build_folder(config, device, seed, channels_last, in_channels)
    data: TensorDataset = load_dataset(config.name, config.root, config.download)
    if config.image_size and tuple(data.input_shape[1:]) != (config.image_size, config.image_size):
        data = replace(data, train_images=resize_images(data.train_images, config.image_size),
                                   test_images=resize_images(data.test_images, config.image_size))
    train_x, train_y = data.train_images, data.train_labels
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    (train_x, train_y), (val_x, val_y) = split_validation(train_x, train_y, config.val_fraction, seed)
    preprocess, state = _fit_preprocess(config.normalize, train_x)
    augment = build_augment(config, data.num_classes, data.name)

    def loader(x, y, train: bool) -> TensorLoader:
        return TensorLoader(x.to(device), y.to(device), config.batch_size if train else config.eval_batch_size,
                            shuffle=train, drop_last=train and len(x) > config.batch_size,
                            transform=augment if train else None, preprocess=preprocess,
                            channels_last=channels_last, seed=seed)

    return DataBundle(
        train=loader(train_x, train_y, True),
        val=loader(val_x, val_y, False) if len(val_x) else None,
        test=loader(data.test_images, data.test_labels, False),
        classes=data.classes, input_shape=data.input_shape, preprocess=preprocess, preprocess_state=state,
        test_images=data.test_images,
    )


class _FolderBatches:
    """DataLoader batches (uint8, from workers) -> device, augmented and normalised like tensor batches."""

    def __init__(self, loader, device, transform, preprocess, channels_last, seed):
        self.loader, self.device, self.transform = loader, device, transform
        self.preprocess, self.channels_last, self.seed, self.epoch = preprocess, channels_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield prepare_batch(x, y, self.transform, self.preprocess, self.channels_last, gen)


def _build_folder(config: DataConfig, device: torch.device, seed: int, channels_last: bool,
                  in_channels: int | None) -> DataBundle:
    classes, train_files, test_files, _ = folder_splits(config.name)
    channels = in_channels or 3
    first = read_image(train_files[0][0], channels, None)
    size = (config.image_size, config.image_size) if config.image_size else tuple(first.shape[1:])
    train_set = ImageFolder(config.name, channels, size, train_files, classes)
    if config.train_limit:
        train_set.samples = train_set.samples[:config.train_limit]
    val_set = None
    if config.val_fraction:
        n_val = int(round(len(train_set) * config.val_fraction))
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
        samples = train_set.samples
        val_set = ImageFolder(config.name, channels, size, [samples[i] for i in sorted(order[:n_val])], classes)
        train_set.samples = [samples[i] for i in sorted(order[n_val:])]
    # statistics from up to 2,000 training images: enough for per-channel mean/std
    sample = torch.stack([train_set[i][0] for i in range(min(len(train_set), 2000))])
    preprocess, state = _fit_preprocess(config.normalize, sample)
    augment = build_augment(config, len(classes), str(config.name))

    def wrap(ds, train):
        loader = folder_loader(ds, config.batch_size if train else config.eval_batch_size, train,
                               config.num_workers, seed, drop_last=train and len(ds) > config.batch_size)
        return _FolderBatches(loader, device, augment if train else None, preprocess, channels_last, seed)

    test_set = ImageFolder(config.name, channels, size, test_files, classes)
    return DataBundle(train=wrap(train_set, True), val=wrap(val_set, False) if val_set else None,
                      test=wrap(test_set, False), classes=classes, input_shape=(channels, *size),
                      preprocess=preprocess, preprocess_state=state)
