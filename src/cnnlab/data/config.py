"""The data section of a run's configuration (``data.*`` keys): dataset, split, preprocessing, augmentation.

It lives in the data layer, which builds loaders from it (:func:`cnnlab.data.bundle.build_data`);
``cnnlab.engine.config`` re-exports it as part of :class:`~cnnlab.engine.config.TrainConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass

from cnnlab._errors import CnnlabError


# detection datasets (cnnlab.data.detection_data builds them): named here so any builder can tell them apart
DETECTION_DATASETS = ("fashion_det", "trees")
PREFIXES = ("voc:", "coco:")


def is_detection_data(name: str) -> bool:
    """Whether ``data.name`` names a detection set (for a dispatcher such as ``build_data``)."""
    return name in DETECTION_DATASETS or name.startswith(PREFIXES)


# segmentation datasets (cnnlab.data.segmentation_data builds them); "vocseg:" is not "voc:", so the two never clash
SEGMENTATION_DATASETS = ("fashion_seg", "nuclei")
SEGMENTATION_PREFIXES = ("vocseg:", "masks:")


def is_segmentation_data(name: str) -> bool:
    """Whether ``data.name`` names a segmentation set (images with a class per pixel)."""
    return name in SEGMENTATION_DATASETS or name.startswith(SEGMENTATION_PREFIXES)


@dataclass
class DataConfig:
    """Dataset, split, preprocessing and augmentation.

    Args:
        name: a dataset name (``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``digits``,
            ``mnist_5k``) or a folder with one sub-folder of images per class; for detection models
            ``fashion_det``, ``trees``, ``voc:PATH`` or ``coco:PATH/annotations.json``; for segmentation models
            ``fashion_seg``, ``nuclei``, ``vocseg:PATH`` (VOC layout) or ``masks:PATH`` (``images/`` + ``masks/``).
        root: where the files are cached, in torchvision's layout (default ``~/.cache/cnnlab/data/<name>``).
        val_fraction: share of the training split held out for validation (fixed by the seed).
        image_size: resize the images to this square size (named datasets: once, when loaded); None keeps theirs.
        normalize: ``standard`` (per-channel mean/std of the training split), ``pca``, ``zca`` or ``none``.
        flip, vflip, crop_padding, resized_crop_scale, rotate, translate, scale, shear, jitter, hue,
            cutout, mixup, cutmix: batched augmentation (0 / False = off); ``jitter`` is the brightness,
            contrast and saturation range, ``hue`` the hue shift (fraction of the colour circle, <= 0.5);
            mixup and cutmix are Beta alphas.
        train_limit: train on N images only (quick experiments; 0 = all): a random subset stratified by
            class, fixed whatever the run's seed.
        num_workers: DataLoader workers for image folders.
        eval_tile, eval_tile_overlap: detection only: evaluate (val, test, ``cnnlab eval``) on overlapping
            ``eval_tile`` x ``eval_tile`` windows of each image, merged (``cnnlab.detection.tiling``), for images
            larger than the model's input (0 = whole images); neighbours share ``eval_tile_overlap`` of a window.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = True
    val_fraction: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 1000
    image_size: int | None = None
    normalize: str = "standard"
    flip: bool = False
    vflip: bool = False
    crop_padding: int = 0
    resized_crop_scale: float = 0.0
    rotate: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    jitter: float = 0.0
    hue: float = 0.0
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    train_limit: int = 0
    num_workers: int = 2
    eval_tile: int = 0
    eval_tile_overlap: float = 0.25


def refuse_eval_tile(config: DataConfig) -> None:
    """``data.eval_tile`` is tiled detection; other tasks' data refuse it by name rather than ignore it."""
    if config.eval_tile:
        raise CnnlabError(f"data.eval_tile={config.eval_tile} is tiled detection inference; data "
                          f"{config.name!r} is not a detection set: leave data.eval_tile at 0")
