"""Segmentation data for the engine: ``build_segmentation_data(DataConfig, device)`` -> a :class:`SegmentationBundle`.

``train``/``val``/``test`` yield ``(images, masks)`` on the device: images float32 (B, C, H, W) normalised with
the per-channel mean/std of the training images (``preprocess``/``preprocess_state``, as classification
records them, so ``cnnlab segment`` normalises new images the same way), masks int64 (B, H, W) with class
indices 0..K-1 (0 = background) and ``ignore_index`` (255) where no loss or metric should look (VOC's object
borders, padding). ``classes[0] == "background"``. Names (see docs/data_segmentation.md):

- ``fashion_seg``: fashion_det's canvases with a class per pixel (11 classes, grey, C = 1), tensor-resident.
- ``nuclei``: the stardist nuclei image, foreground/background, tiles of three quadrants (C = 1; tensor-resident).
- ``vocseg:PATH``: a VOC folder (``JPEGImages/``, palette PNGs in ``SegmentationClass/``,
  ``ImageSets/Segmentation/{train,val}.txt``), VOC's 21 classes; RGB colour masks in VOC's palette are read too.
- ``masks:PATH``: ``PATH/images/*`` with ``PATH/masks/<same name>.png`` of class indices, class names from an
  optional ``PATH/classes.txt`` (one per line from index 0, the first ``background``), optional split lists
  ``PATH/{train,val,test}.txt``.

Splits of the folders: the split files when present (no test list: test is val), else detection's rule over
the sorted names (``i % 10 == 4`` val, ``== 9`` test). Variable-size folder images train at their own size
(batches padded by :class:`~cnnlab.data.collate.SegmentationCollate`: images with 0, masks with 255) or, with
``data.image_size=S``, resized to shorter side S and randomly cropped to S x S (evaluation: shorter side S).

Augmentation (training only), through ``torchvision.transforms.v2`` so masks move with the images:
``data.flip`` / ``data.vflip`` (p = 0.5 each), ``data.scale=(lo, hi)`` (random rescale by a factor in [lo, hi]
then crop/pad back to the training size, padding ignored), ``data.jitter`` (RGB folders: photometric distort,
p = 0.5). The other batched classification augmentations are refused. Order and augmentation depend only on
``(seed, epoch)`` (``set_epoch``); ``shard(rank, world_size)`` splits the training batches under torchrun.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from cnnlab._errors import CnnlabError
from cnnlab.data.annotated import SegmentationFolder, read_class_mask
from cnnlab.data.annotations import VOC_CLASSES, read_split
from cnnlab.data.bundle import SUBSET_SEED, DataBundle, resize_images
from cnnlab.data.collate import SegmentationCollate
from cnnlab.data.config import DataConfig, refuse_eval_tile
from cnnlab.data.detection_data import DetectionBatches, TensorShards, _epoch_seed, _rule_split
from cnnlab.data.folder import IMAGE_EXTENSIONS, read_image
from cnnlab.data.joint_transforms import JointAugment, segmentation_transforms
from cnnlab.data.preprocess import Normalize

IGNORE_INDEX = 255
VOC_SEG_CLASSES = ["background", *VOC_CLASSES]
# batched classification augmentations that would move pixels without the masks (or mix labels): refused
REFUSED = ("crop_padding", "resized_crop_scale", "rotate", "translate", "shear", "hue", "cutout", "mixup", "cutmix")
STATS_IMAGES = 500  # folder images read (a seeded random sample) to fit the normalisation
TEST_IMAGES_MAX = 500  # folder test sets up to this size keep their uint8 images for overlays


@dataclass
class SegmentationBundle(DataBundle):
    """A :class:`DataBundle` of ``(images, masks)`` batches.

    Args:
        ignore_index: the mask value no loss or metric counts (VOC's borders, padding): 255.
    """

    ignore_index: int = IGNORE_INDEX


@dataclass(frozen=True)
class SegAugment:
    """Training augmentation of segmentation data (from ``data.*``).

    Args:
        hflip, vflip: probability of a horizontal / vertical flip per image.
        scale: (lo, hi) random rescale factor per image, then crop/pad to the training size; None: off.
        photometric: probability of ``RandomPhotometricDistort`` (RGB only).
    """

    hflip: float = 0.0
    vflip: float = 0.0
    scale: tuple[float, float] | None = None
    photometric: float = 0.0


def segmentation_augment(config: DataConfig, grey: bool) -> SegAugment:
    """The ``data.*`` augmentation as a :class:`SegAugment`; refused options raise, naming them."""
    default = DataConfig()
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (scale may be a list)
    refused = [n for n in REFUSED if norm(getattr(config, n)) != norm(getattr(default, n))]
    if refused:
        raise CnnlabError(f"data.{', data.'.join(refused)} do not apply to segmentation data (they would move the "
                          "pixels without the masks, or mix labels); use data.flip, data.vflip, data.scale and "
                          "data.jitter")
    scale = norm(config.scale)
    if (not isinstance(scale, tuple) or len(scale) != 2 or not all(isinstance(v, (int, float)) for v in scale)
            or not 0 < scale[0] <= scale[1]):
        raise CnnlabError(f"data.scale must be (lo, hi) rescale factors with 0 < lo <= hi, got {config.scale!r}")
    if config.jitter and grey:
        raise CnnlabError(f"data.jitter does not apply to {config.name} (grey images); use data.flip, data.vflip "
                          "or data.scale")
    scale = (float(scale[0]), float(scale[1]))
    return SegAugment(hflip=0.5 if config.flip else 0.0, vflip=0.5 if config.vflip else 0.0,
                      scale=None if scale == (1.0, 1.0) else scale, photometric=0.5 if config.jitter else 0.0)


def _check_normalize(kind: str) -> None:
    if kind not in ("standard", "none"):
        raise CnnlabError(f"data.normalize={kind!r} does not apply to segmentation data (PCA/ZCA whitening needs "
                          "one fixed image size); use standard or none")


def _state(norm: Normalize | None) -> dict[str, Any]:
    return {"kind": "none"} if norm is None else {"kind": "standard", "mean": list(norm.mean), "std": list(norm.std)}


def fit_tensor_normalize(kind: str, images: torch.Tensor) -> Normalize | None:
    """Per-channel mean/std of uint8 (N, C, H, W) training images (``data.normalize``: standard or none).

    From each channel's 256-bin histogram (exact: the values are integers), which takes a fraction of a second
    where float64 chunks of 8,000 canvases took several; equal to ``Normalize.fit`` up to float64 rounding.
    """
    _check_normalize(kind)
    if kind == "none":
        return None
    if images.ndim != 4 or len(images) == 0 or images.dtype != torch.uint8:
        raise CnnlabError(f"the normalisation is fitted on non-empty uint8 (N, C, H, W) images, got "
                          f"{images.dtype} {tuple(images.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).double()
        m = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - m) ** 2).sum() / counts.sum())
        mean.append(m)
        std.append(max(var, 1e-24) ** 0.5)
    return Normalize(tuple(mean), tuple(std))


class TensorSegmentationBatches(TensorShards):
    """Batches of a tensor-resident segmentation set: uint8 images and masks on the device, sliced, augmented,
    normalised and cast a batch at a time; no workers.

    Args:
        images: uint8 (N, C, H, W); masks: uint8 (N, H, W) labels; batch_size; shuffle: training order;
        augment: training augmentation or None; preprocess: the normalisation (None: images in [0, 1]);
        device; seed: base of the per-epoch generators; drop_last; ignore_index: padding of rescaled masks.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, batch_size: int, *, shuffle: bool,
                 augment: SegAugment | None, preprocess: Normalize | None, device: torch.device, seed: int,
                 drop_last: bool = False, ignore_index: int = IGNORE_INDEX) -> None:
        if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise CnnlabError(f"segmentation tensors must be images (N, C, H, W) and masks (N, H, W), got "
                              f"{tuple(images.shape)} and {tuple(masks.shape)}")
        self.images, self.masks = images.to(device), masks.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.preprocess, self.device, self.seed, self.epoch = augment, preprocess, device, seed, 0
        self.rescale = None
        if augment is not None and augment.scale is not None:
            h, w = images.shape[-2:]
            lo, hi = (max(1, round(min(h, w) * s)) for s in augment.scale)
            self.rescale = segmentation_transforms(JointAugment(hflip=0.0, random_resize=(lo, hi), crop=(h, w)),
                                                   train=True, ignore_index=ignore_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))  # CPU: same on every device
        n, aug = len(self.images), self.augment or SegAugment()
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        # per item (not per position), drawn for the whole epoch before sharding: ranks agree
        hflip = torch.rand(n, generator=gen) < aug.hflip
        vflip = torch.rand(n, generator=gen) < aug.vflip
        seeds = torch.randint(0, 2 ** 62, (n,), generator=gen)
        order = self._rank_order(order)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            on_device = idx.to(self.device)
            x, m = self.images[on_device].float().div_(255), self.masks[on_device]
            if self.rescale is not None:
                x, m = self._rescale(x, m, seeds[idx].tolist())
            if aug.hflip:  # (B, H, W) flags -> flip the last axis of the chosen items, image and mask alike
                f = hflip[idx].to(self.device).view(-1, 1, 1)
                x, m = torch.where(f[:, None], x.flip(-1), x), torch.where(f, m.flip(-1), m)
            if aug.vflip:
                f = vflip[idx].to(self.device).view(-1, 1, 1)
                x, m = torch.where(f[:, None], x.flip(-2), x), torch.where(f, m.flip(-2), m)
            if self.preprocess is not None:
                x = self.preprocess(x)
            yield x, m.long()

    def _rescale(self, x: torch.Tensor, m: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item through the v2 rescale-and-crop pipeline, its random draws seeded by its own seed."""
        xs, ms = [], []
        for image, mask, s in zip(x, m, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                image, target = self.rescale(tv_tensors.Image(image), {"mask": tv_tensors.Mask(mask)})
            xs.append(image.as_subclass(torch.Tensor))
            ms.append(target["mask"].as_subclass(torch.Tensor))
        return torch.stack(xs), torch.stack(ms)


class SegmentationBatches(DetectionBatches):
    """DataLoader batches of a segmentation folder, padded by :class:`SegmentationCollate`, moved to the device
    and normalised there; order and augmentation fixed by ``(seed, epoch)`` as detection's.

    Args:
        dataset: items ``(image float (3, H, W) in [0, 1], {"mask": Mask})``; batch_size; shuffle;
        num_workers; device; seed; preprocess: the normalisation; ignore_index: the mask padding; drop_last.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device,
                 seed: int, *, preprocess: Normalize | None, ignore_index: int = IGNORE_INDEX,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, batch_size, shuffle, num_workers, device, seed, drop_last)
        self.preprocess = preprocess
        self.loader = DataLoader(self.items, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                 collate_fn=SegmentationCollate(ignore_index), generator=self.generator,
                                 drop_last=drop_last, pin_memory=torch.device(device).type == "cuda")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for images, masks in super().__iter__():
            yield (self.preprocess(images) if self.preprocess is not None else images), masks


def voc_palette() -> np.ndarray:
    """(256, 3) uint8: VOC's colour map (the devkit's bit-interleaving of the index; 255 is (224, 224, 192))."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        palette[i] = rgb
    return palette


def colours_to_labels(rgb: np.ndarray, palette: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """(H, W, 3) colours -> (H, W) uint8 labels by ``palette``; a colour not in it is an error naming the file."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    values, inverse = np.unique(codes, return_inverse=True)
    lut = {(r << 16) | (g << 8) | b: label for (r, g, b), label in palette.items()}
    unknown = [v for v in values.tolist() if v not in lut]
    if unknown:
        v = unknown[0]
        ys, xs = np.nonzero(codes == v)
        colour = (v >> 16, (v >> 8) & 255, v & 255)
        raise CnnlabError(f"mask {path} has colour {colour} at x={xs[0]}, y={ys[0]} ({len(xs)} pixels; "
                          f"{len(unknown)} unknown colours in all), which is not in the VOC palette; expected the "
                          f"{len(palette) - 1} class colours or the border colour (224, 224, 192), or a palette "
                          "(P) PNG of class indices")
    return np.array([lut[v] for v in values.tolist()], dtype=np.uint8)[inverse.reshape(codes.shape)]


class MaskFolder(SegmentationFolder):
    """:class:`~cnnlab.data.annotated.SegmentationFolder` that also reads RGB colour masks of a palette
    (``palette``: VOC's) and can require a mask for every image when there is no split list.

    Args:
        palette: ``{(r, g, b): label}`` for colour masks; None: masks must be palette or grey PNGs of indices.
        require_masks: without a split list, an image with no mask is an error (not skipped silently).
        (the others as SegmentationFolder's)
    """

    def __init__(self, root: str | Path, split: str | None, num_classes: int, *,
                 palette: dict[tuple[int, int, int], int] | None = None, require_masks: bool = False,
                 transforms: Any = None,
                 ignore_index: int = IGNORE_INDEX, image_dir: str = "JPEGImages", mask_dir: str = "SegmentationClass",
                 split_dir: str = "ImageSets/Segmentation") -> None:
        super().__init__(root, split, num_classes, ignore_index, transforms, image_dir, mask_dir, split_dir)
        self.palette = palette
        if split is None and require_masks:
            masks = self.root / mask_dir
            images = sorted(p for p in (self.root / image_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            missing = [masks / f"{p.stem}.png" for p in images if not (masks / f"{p.stem}.png").is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CnnlabError(f"image {self.root / image_dir / missing[0].stem}.* has no mask {missing[0]}"
                                  f"{more}; every image needs a PNG mask of the same name")

    def read_mask(self, path: Path) -> np.ndarray:
        from PIL import Image

        if self.palette is not None:
            try:
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8) if img.mode in ("RGB", "RGBA") else None
            except OSError as e:
                raise CnnlabError(f"cannot read mask {path}: {e}") from None
            if rgb is not None:
                return colours_to_labels(rgb, self.palette, path)
        return read_class_mask(path)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image_id, image_path, mask_path = self.samples[i]
        image = tv_tensors.Image(read_image(image_path, 3, None))
        mask = self.read_mask(mask_path)
        if mask.shape != tuple(image.shape[-2:]):
            raise CnnlabError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                              f"{image.shape[-1]}x{image.shape[-2]}; a mask must have its image's size")
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
        if bad.size:
            raise CnnlabError(f"mask {mask_path} holds values {bad[:10].tolist()}; expected class indices "
                              f"0..{self.num_classes - 1} or {self.ignore_index} (ignored)")
        target = {"mask": tv_tensors.Mask(torch.from_numpy(mask)), "image_id": image_id}
        return self.transforms(image, target) if self.transforms is not None else (image, target)


@dataclass(frozen=True)
class FolderLayout:
    """Where a folder kind keeps its parts. Args: image_dir, mask_dir, split_dir (split lists' folder)."""

    image_dir: str
    mask_dir: str
    split_dir: str


VOC_LAYOUT = FolderLayout("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
MASKS_LAYOUT = FolderLayout("images", "masks", ".")


def folder_transforms(aug: SegAugment, size: int | None, train: bool, ignore_index: int = IGNORE_INDEX) -> T.Compose:
    """The v2 pipeline of a folder set: training rescales (shorter side ``size``, times a factor in ``aug.scale``),
    flips and crops ``size`` x ``size`` (padding: 0 / ignore); evaluation resizes the shorter side to ``size``."""
    if aug.scale is not None and size is None:
        raise CnnlabError("data.scale (scale jitter) needs data.image_size for a folder set: the size the "
                          "rescaled images are cropped back to")
    if not train:
        return segmentation_transforms(JointAugment(hflip=0.0, resize=size), train=False, ignore_index=ignore_index)
    lo, hi = aug.scale or (1.0, 1.0)
    cfg = JointAugment(hflip=aug.hflip, vflip=aug.vflip, photometric=aug.photometric,
                       random_resize=(max(1, round(size * lo)), max(1, round(size * hi))) if size else None,
                       crop=(size, size) if size else None)
    return segmentation_transforms(cfg, train=True, ignore_index=ignore_index)


def _read_classes(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2 or names[0].lower() != "background" or len(set(names)) != len(names):
        raise CnnlabError(f"{path} lists {names[:5]}...; expected one distinct class name per line from index 0, "
                          "the first 'background' (label 0), at least one more")
    return names


def _scan_classes(root: Path, layout: FolderLayout) -> list[str]:
    """Without classes.txt: K = the largest label in any mask (255 aside) + 1, named class_1..class_{K-1}."""
    folder = root / layout.mask_dir
    top = 0
    for path in sorted(folder.glob("*.png")):
        values = np.unique(read_class_mask(path))
        values = values[values != IGNORE_INDEX]
        top = max(top, int(values.max()) if values.size else 0)
    if top == 0:
        raise CnnlabError(f"masks:{root}: every mask in {folder} is background (0) or ignored (255); a segmentation "
                          "set needs at least one other class (or give classes.txt)")
    return ["background", *(f"class_{k}" for k in range(1, top + 1))]


def _rule(n: int, source: str, layout: FolderLayout) -> dict[str, list[int]]:
    """Detection's rule split (i % 10 == 4 val, == 9 test), with this layout's split lists named when too few."""
    if n < 10:
        where = "" if layout.split_dir == "." else f"{layout.split_dir}/"
        raise CnnlabError(f"{source}: {n} images are too few for the rule split (every 10th image val and test, "
                          f"needs >= 10); give split lists {where}train.txt and {where}val.txt")
    return _rule_split(n, source)


def _folder_splits(root: Path, layout: FolderLayout, make) -> tuple[Any, Any, Any]:
    """(train, val, test) datasets: the split lists when present, else detection's rule split of the names."""
    split_dir = root / layout.split_dir
    exists = {s: (split_dir / f"{s}.txt").is_file() for s in ("train", "trainval", "val", "test")}
    train_name = "train" if exists["train"] else "trainval" if exists["trainval"] else None
    if train_name is None:
        probe = make(None, False, None)
        rule = _rule(len(probe), f"{root}", layout)
        return tuple(make(None, s == "train", rule[s]) for s in ("train", "val", "test"))
    if exists["val"]:
        train, val, rule_test = make(train_name, True, None), make("val", False, None), None
    else:  # only a training list: its own rule split gives val (and test, without test.txt)
        rule = _rule(len(read_split(split_dir / f"{train_name}.txt")), str(split_dir / f"{train_name}.txt"), layout)
        train, val = make(train_name, True, rule["train"]), make(train_name, False, rule["val"])
        rule_test = make(train_name, False, rule["test"])
    test = make("test", False, None) if exists["test"] else rule_test if rule_test is not None else val
    return train, val, test


def _fit_folder_normalize(kind: str, dataset: MaskFolder) -> Normalize | None:
    """Per-channel mean/std over the pixels of up to STATS_IMAGES training images (a seeded sample); reading their
    masks too, so a bad pair among them fails now rather than in a worker."""
    _check_normalize(kind)
    raw = copy.copy(dataset)
    raw.transforms = None
    n = len(raw)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[:STATS_IMAGES].sort().values
    total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for i in picked.tolist():
        image = raw[i][0].as_subclass(torch.Tensor).to(torch.float64) / 255
        total += image.sum((1, 2))
        squares += (image * image).sum((1, 2))
        count += image[0].numel()
    if kind == "none":
        return None
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=1e-12).sqrt()
    return Normalize(tuple(mean.tolist()), tuple(std.tolist()))


def _folder_test_images(dataset: MaskFolder, size: int | None) -> torch.Tensor | None:
    """uint8 (N, 3, H, W) test images as evaluated (shorter side resized to ``size``), when the set is small and
    the files share one size (read from their headers); else None."""
    from PIL import Image

    if len(dataset) > TEST_IMAGES_MAX:
        return None
    sizes = set()
    for _, path, _ in dataset.samples:
        with Image.open(path) as img:
            sizes.add(img.size)
    if len(sizes) != 1:
        return None
    resize = T.Resize([size], antialias=True) if size else None
    out = []
    for _, path, _ in dataset.samples:
        image = tv_tensors.Image(read_image(path, 3, None))
        out.append((resize(image) if resize else image).as_subclass(torch.Tensor))
    return torch.stack(out)


def _build_folder(config: DataConfig, device: torch.device, seed: int, root: Path, kind: str) -> SegmentationBundle:
    voc = kind == "vocseg"
    layout = VOC_LAYOUT if voc else MASKS_LAYOUT
    for part in (layout.image_dir, layout.mask_dir):
        if not (root / part).is_dir():
            expected = ("JPEGImages/, SegmentationClass/ (palette PNGs) and ImageSets/Segmentation/{train,val}.txt"
                        if voc else "images/ and masks/ (PNG masks of class indices, same names), optionally "
                        "classes.txt and {train,val,test}.txt")
            raise CnnlabError(f"{kind}:{root}: no {part}/ folder (expected {expected})")
    classes = VOC_SEG_CLASSES if voc else (_read_classes(root) or _scan_classes(root, layout))
    colours = voc_palette()
    palette = {tuple(int(v) for v in colours[i]): i for i in (*range(len(classes)), IGNORE_INDEX)} if voc else None
    aug, size = segmentation_augment(config, grey=False), config.image_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CnnlabError(f"data.image_size must be a positive size in pixels, got {size!r}")

    def make(split: str | None, train: bool, keep: list[int] | None) -> MaskFolder:
        ds = MaskFolder(root, split, len(classes), palette=palette, require_masks=not voc,
                        transforms=folder_transforms(aug, size, train),
                        image_dir=layout.image_dir, mask_dir=layout.mask_dir, split_dir=layout.split_dir)
        if keep is not None:
            ds.samples = [ds.samples[i] for i in keep]
        return ds

    train_set, val_set, test_set = _folder_splits(root, layout, make)
    if config.train_limit:  # the first N, as detection's folders
        train_set.samples = train_set.samples[:config.train_limit]
    if len(train_set) == 0:
        raise CnnlabError(f"data.name={config.name!r}: the training split is empty")
    preprocess = _fit_folder_normalize(config.normalize, train_set)
    bs, workers = config.batch_size, config.num_workers

    def wrap(ds: MaskFolder, train: bool) -> SegmentationBatches:
        return SegmentationBatches(ds, bs if train else config.eval_batch_size, train, workers, device, seed,
                                   preprocess=preprocess, drop_last=train and len(ds) > bs)

    shape = (3, size, size) if size else (3, *read_image(train_set.samples[0][1], 3, None).shape[-2:])
    return SegmentationBundle(
        train=wrap(train_set, True), val=wrap(val_set, False) if len(val_set) else None, test=wrap(test_set, False),
        classes=list(classes), input_shape=shape, preprocess=preprocess, preprocess_state=_state(preprocess),
        test_images=_folder_test_images(test_set, size))


def _tensor_bundle(config: DataConfig, device: torch.device, seed: int, splits: dict[str, Any], classes: list[str],
                   fit_on: torch.Tensor, aug: SegAugment) -> SegmentationBundle:
    preprocess = fit_tensor_normalize(config.normalize, fit_on)
    bs = config.batch_size

    def wrap(pair: tuple[torch.Tensor, torch.Tensor], train: bool) -> TensorSegmentationBatches:
        images, masks = pair
        return TensorSegmentationBatches(images, masks, bs if train else config.eval_batch_size, shuffle=train,
                                         augment=aug if train else None, preprocess=preprocess, device=device,
                                         seed=seed, drop_last=train and len(images) > bs)

    train_images = splits["train"][0]
    val = splits.get("val")
    return SegmentationBundle(
        train=wrap(splits["train"], True), val=wrap(val, False) if val is not None and len(val[0]) else None,
        test=wrap(splits["test"], False), classes=list(classes), input_shape=tuple(train_images.shape[1:]),
        preprocess=preprocess, preprocess_state=_state(preprocess), test_images=splits["test"][0])


def resize_pair(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) bilinear with antialiasing and masks (N, H, W) nearest, to size x size, once."""
    resized = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")
    return resize_images(images, size), resized[:, 0].to(torch.uint8)


def _build_fashion_seg(config: DataConfig, device: torch.device, seed: int) -> SegmentationBundle:
    from cnnlab.data import fashion_seg as FS

    aug = segmentation_augment(config, grey=True)
    splits = FS.load_fashion_seg(FS.FASHION_SEG_CONFIG, root=config.root, download=config.download)
    if config.image_size and config.image_size != splits["train"][0].shape[-1]:
        splits = {s: resize_pair(*pair, config.image_size) for s, pair in splits.items()}
    if config.train_limit:  # the first N canvases, as fashion_det's
        splits["train"] = tuple(t[:config.train_limit] for t in splits["train"])
    return _tensor_bundle(config, device, seed, splits, FS.FASHION_SEG_CLASSES, splits["train"][0], aug)


def _build_nuclei(config: DataConfig, device: torch.device, seed: int) -> SegmentationBundle:
    from cnnlab.data import nuclei as N

    aug = segmentation_augment(config, grey=True)
    tile = config.image_size or N.TILE
    s = N.load_nuclei(config.root, config.download, tile=tile, stride=max(1, tile // 4),
                      val_fraction=config.val_fraction)
    train = (s.train_images, s.train_masks)
    if config.train_limit and config.train_limit < len(s.train_images):  # a random subset of the tiles (fixed)
        keep = torch.randperm(len(s.train_images), generator=torch.Generator().manual_seed(SUBSET_SEED))
        keep = keep[:config.train_limit].sort().values
        train = (s.train_images[keep], s.train_masks[keep])
    splits = {"train": train, "val": (s.val_images, s.val_masks), "test": (s.test_images, s.test_masks)}
    return _tensor_bundle(config, device, seed, splits, N.CLASSES, s.fit_images, aug)


def build_segmentation_data(config: DataConfig, device: torch.device | str, *, seed: int = 0) -> SegmentationBundle:
    """The segmentation bundle for ``config.name`` (``fashion_seg``, ``nuclei``, ``vocseg:PATH``, ``masks:PATH``).

    Args:
        config: the data section (``batch_size``, ``eval_batch_size``, ``num_workers``, ``normalize``,
            ``image_size``, ``flip``, ``vflip``, ``scale``, ``jitter``, ``train_limit``, ``val_fraction`` (nuclei),
            ``root`` (cache folder of the named sets), ``download``).
        device: where batches go.
        seed: base of the per-epoch shuffling and augmentation seeds.
    """
    refuse_eval_tile(config)
    device = torch.device(device)
    name = config.name
    if name == "fashion_seg":
        return _build_fashion_seg(config, device, seed)
    if name == "nuclei":
        return _build_nuclei(config, device, seed)
    for kind in ("vocseg", "masks"):
        if name.startswith(f"{kind}:"):
            root = Path(name[len(kind) + 1:]).expanduser()
            if not root.is_dir():
                raise CnnlabError(f"{name}: {root} is not a folder")
            return _build_folder(config, device, seed, root, kind)
    raise CnnlabError(f"unknown segmentation data {name!r} (expected fashion_seg, nuclei, vocseg:PATH or masks:PATH)")
