"""From a DataConfig to device batches: dataset, split, preprocessing fitted on the training images, augmentation.

This is the data layer's one entry point for the engine: :func:`build_data` reads ``config``
once and returns a :class:`DataBundle` whose ``train``/``val``/``test`` yield ``(x, y)`` batches
already on the device, augmented and normalised. The engine (and a task) only iterates them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError
from cnnlab.data import augment as A
from cnnlab.data import datasets as D
from cnnlab.data.config import DataConfig, is_detection_data, is_segmentation_data, refuse_eval_tile
from cnnlab.data.folder import ImageFolder, folder_loader, folder_splits, read_image
from cnnlab.data.loader import TensorLoader, prepare_batch
from cnnlab.data.preprocess import Normalize, PCAWhiten

# datasets whose classes change under vertical flips and large rotations (digits: 6 <-> 9)
ORIENTATION_SENSITIVE = {"mnist", "digits", "mnist_5k"}
# the subsets behind data.train_limit and folder statistics use this seed, not the run's: runs that
# differ only in their seed train on the same images
SUBSET_SEED = 0
# images read to fit a folder's normalisation: plenty for per-channel mean/std
FOLDER_STATS_IMAGES = 2000


@runtime_checkable
class DeviceBatches(Protocol):
    """What ``DataBundle.train/val/test`` are: ``len()`` batches of ``(x, y)`` on the device, ready for the model.

    ``x`` is float (B, C, H, W), augmented (training only) and normalised; ``y`` holds int64 labels
    (B,) or, under mixup/cutmix, soft targets (B, K). Loaders whose order or augmentation depends on
    the epoch also have ``set_epoch(epoch)``, which the trainer calls before each epoch.
    """

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    """Device batches and what evaluation and prediction need to know about the data.

    Args:
        train, val, test: :class:`DeviceBatches`; val is None without a split.
        classes: class names; input_shape: (C, H, W) of the model input.
        preprocess: the fitted normalisation (also applied by ``cnnlab predict``).
        preprocess_state: JSON-able description of it, saved with the run.
        preprocess_tensors: the tensors it needs beyond that (PCA/ZCA mean and matrix), saved in the
            checkpoint's safetensors; :func:`preprocess_from_state` rebuilds it from both.
        test_images: uint8 test images (tensor datasets), for the misclassified-examples grid.
        eval_tiles: detection: ``(tile_size, overlap)`` when val/test images are evaluated by tiles, else None.
    """

    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]] | None
    test: Iterable[tuple[torch.Tensor, torch.Tensor]]
    classes: list[str]
    input_shape: tuple[int, int, int]
    preprocess: Any
    preprocess_state: dict[str, Any]
    test_images: torch.Tensor | None = None
    preprocess_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_tiles: tuple[int, float] | None = None

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


def fit_preprocess(kind: str, images: torch.Tensor) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """(preprocess, JSON-able state, tensors) fitted on uint8 training images; ``kind`` is data.normalize."""
    if kind == "none":
        return None, {"kind": "none"}, {}
    if kind == "standard":
        norm = Normalize.fit(images)
        return norm, {"kind": kind, "mean": list(norm.mean), "std": list(norm.std)}, {}
    if kind in ("pca", "zca"):
        whiten = PCAWhiten.fit(images, zca=kind == "zca")
        return whiten, {"kind": kind, "shape": list(whiten.shape)}, {"mean": whiten.mean, "matrix": whiten.matrix}
    raise CnnlabError(f"data.normalize={kind!r} is not one of standard, pca, zca, none")


def preprocess_from_state(state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """The preprocessing a run was trained with, from its saved state (and tensors, for PCA/ZCA).

    ``tensors`` default to ``state["tensors"]``, where :func:`cnnlab.engine.checkpoint.load_checkpoint`
    puts those it read from the checkpoint.
    """
    kind = state.get("kind")
    if kind == "standard":
        return Normalize(tuple(state["mean"]), tuple(state["std"]))
    if kind in (None, "none"):
        return None
    if kind in ("pca", "zca"):
        tensors = tensors if tensors is not None else state.get("tensors") or {}
        if not {"mean", "matrix"} <= set(tensors):
            raise CnnlabError(f"this run's {kind.upper()} whitening is not in its checkpoint (runs trained before "
                              "cnnlab stored it); train it again to use it for prediction")
        mean, matrix = tensors["mean"].float(), tensors["matrix"].float()
        shape = tuple(state.get("shape") or ())
        size = mean.numel()
        if len(shape) != 3 or matrix.shape != (size, size) or size != shape[0] * shape[1] * shape[2]:
            raise CnnlabError(f"this run's {kind.upper()} whitening is damaged: mean {tuple(mean.shape)}, matrix "
                              f"{tuple(matrix.shape)}, image shape {shape}")
        return PCAWhiten(mean, matrix, shape)  # type: ignore[arg-type]
    raise CnnlabError(f"unknown preprocessing {kind!r} in the run folder (expected standard, pca, zca or none)")


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


def stratified_subset(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of ``n`` samples drawn at random (fixed by ``seed``), each class in its share of ``labels``.

    Class ``c`` with ``n_c`` of the ``N`` samples gets ``floor(n * n_c / N)`` of them, and the
    samples left over go to the classes with the largest remainders (ties: lower class index),
    so the subset keeps the class balance to within one sample. ``n >= N`` keeps them all.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    total = len(labels)
    if n >= total:
        return torch.arange(total)
    classes, counts = labels.unique(return_counts=True)
    quota = counts * n // total
    remainder = counts * n - quota * total
    # the leftover samples go to the largest remainders; stable sort keeps lower class indices first on ties
    extra = torch.sort(-remainder, stable=True).indices[: n - int(quota.sum())]
    quota[extra] += 1
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), quota.tolist()):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(picked).sort().values


def build_data(config: DataConfig, device: torch.device, *, seed: int = 0, channels_last: bool = False,
               in_channels: int | None = None) -> DataBundle:
    """Load the dataset named in ``config`` (or an image folder) and wrap it in device batches."""
    if is_detection_data(config.name):  # before the folder rule: voc:/path has a "/" in it
        raise CnnlabError(f"data {config.name!r} is a detection dataset (images with boxes), not images with one "
                          f"class each: train a detection model on it (`cnnlab models --task detection`)")
    if is_segmentation_data(config.name):  # before the folder rule too: masks:/path has a "/" in it
        raise CnnlabError(f"data {config.name!r} is a segmentation dataset (a class per pixel), not images with one "
                          f"class each: train a segmentation model on it (`cnnlab models --task segmentation`)")
    refuse_eval_tile(config)
    if config.name not in D.DATASETS and (Path(config.name).is_dir() or "/" in config.name):
        return _build_folder(config, device, seed, channels_last, in_channels)
    data: D.TensorDataset = D.load_dataset(config.name, config.root, config.download)
    if config.image_size and tuple(data.input_shape[1:]) != (config.image_size, config.image_size):
        data = replace(data, train_images=resize_images(data.train_images, config.image_size),
                       test_images=resize_images(data.test_images, config.image_size))
    train_x, train_y = data.train_images, data.train_labels
    if config.train_limit:  # a random subset of every class: a file's first N images may all be one class
        keep = stratified_subset(train_y, config.train_limit)
        train_x, train_y = train_x[keep], train_y[keep]
    (train_x, train_y), (val_x, val_y) = split_validation(train_x, train_y, config.val_fraction, seed)
    preprocess, state, tensors = fit_preprocess(config.normalize, train_x)
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
        test_images=data.test_images, preprocess_tensors=tensors,
    )


class FolderBatches:
    """DataLoader batches (uint8, from workers) -> device, augmented and normalised like tensor batches.

    Args:
        loader: the folder's DataLoader; device: where batches go; transform: training augmentation;
        preprocess: normalisation; channels_last: NHWC batches; seed: base of the per-epoch generators.
    """

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


def _labels(files: list[tuple[Path, int]]) -> torch.Tensor:
    return torch.tensor([label for _, label in files], dtype=torch.int64)


def _build_folder(config: DataConfig, device: torch.device, seed: int, channels_last: bool,
                  in_channels: int | None) -> DataBundle:
    classes, train_files, test_files, _ = folder_splits(config.name)
    channels = in_channels or 3
    first = read_image(train_files[0][0], channels, None)
    size = (config.image_size, config.image_size) if config.image_size else tuple(first.shape[1:])
    if config.train_limit:  # a random subset of every class: the files are listed class by class
        train_files = [train_files[i] for i in stratified_subset(_labels(train_files), config.train_limit).tolist()]
    train_set = ImageFolder(config.name, channels, size, train_files, classes)
    val_set = None
    if config.val_fraction:
        n_val = int(round(len(train_set) * config.val_fraction))
        if n_val == 0 or n_val == len(train_set):
            raise CnnlabError(f"data.val_fraction={config.val_fraction} leaves an empty split of "
                              f"{len(train_set)} images")
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
        samples = train_set.samples
        val_set = ImageFolder(config.name, channels, size, [samples[i] for i in sorted(order[:n_val])], classes)
        train_set.samples = [samples[i] for i in sorted(order[n_val:])]
    # statistics from a random sample of every class (the first 2,000 files would be the first classes only)
    picked = stratified_subset(_labels(train_set.samples), FOLDER_STATS_IMAGES).tolist()
    sample = torch.stack([train_set[i][0] for i in picked])
    preprocess, state, tensors = fit_preprocess(config.normalize, sample)
    augment = build_augment(config, len(classes), str(config.name))

    def wrap(ds, train):
        loader = folder_loader(ds, config.batch_size if train else config.eval_batch_size, train,
                               config.num_workers, seed, drop_last=train and len(ds) > config.batch_size)
        return FolderBatches(loader, device, augment if train else None, preprocess, channels_last, seed)

    test_set = ImageFolder(config.name, channels, size, test_files, classes)
    return DataBundle(train=wrap(train_set, True), val=wrap(val_set, False) if val_set else None,
                      test=wrap(test_set, False), classes=classes, input_shape=(channels, *size),
                      preprocess=preprocess, preprocess_state=state, preprocess_tensors=tensors)
