"""Detection data for the engine: ``build_detection_data(DataConfig, device)`` -> a :class:`DataBundle`.

``train``/``val``/``test`` yield ``(images, targets)``: a list of float (3, H, W) images in [0, 1] and a list
of target dicts (``boxes`` float32 (N, 4) XYXY, ``labels`` int64 1..K, ``image_id``, and the format's
per-box fields), already on the device. Names: ``fashion_det`` (tensor-resident, see ``fashion_det.py``),
``trees`` (see ``trees.py``), ``voc:PATH`` (a VOC folder) and ``coco:PATH/annotations.json``.

Splits of ``voc:``/``coco:`` (see docs/data_detection.md): the files' own splits when present, else every
image in file order (VOC: sorted names; COCO: the JSON's ``images``) with index ``i % 10 == 4`` is val,
``i % 10 == 9`` test, the rest train.
Augmentation (training only): ``data.flip`` / ``data.vflip`` -> horizontal / vertical flip (p = 0.5 each),
``data.scale=(lo, hi)`` -> a zoom by a factor drawn in [lo, hi] with the canvas kept (``RandomAffine``; boxes
are clipped to it and dropped when under 1 px wide or high), ``data.jitter > 0`` -> ``RandomPhotometricDistort``
(p = 0.5); the tensor-resident ``fashion_det`` takes ``data.flip`` and ``data.scale`` (its own exact zoom,
:func:`zoom`). The other ``data.*`` augmentations are
refused for detection (they would move pixels without the boxes, or mix labels). ``data.normalize``/``image_size``
do not apply: detectors normalise and resize inside their own transform. ``data.train_limit`` keeps the first N
training images of the split.

Order and augmentation are fixed by ``(seed, epoch)``: ``train.set_epoch(e)`` reseeds the sampler, and each
item's augmentation is seeded by ``(seed, epoch, index)``, so a resumed run, or one with another number of
workers, sees the same batches.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from cnnlab._errors import CnnlabError
from cnnlab._tiles import check_tiling
from cnnlab.data.annotated import CocoDetection, VOCDetection
from cnnlab.data.annotations import drop_degenerate_boxes, read_split, voc_class_names
from cnnlab.data.bundle import DataBundle
from cnnlab.data.collate import batch_to_device, collate_detection
from cnnlab.data.config import DETECTION_DATASETS, PREFIXES, DataConfig, is_detection_data  # noqa: F401  (re-exported)
from cnnlab.data.fashion_det import FASHION_CLASSES, FashionDetConfig, load_fashion_det
from cnnlab.data.joint_transforms import JointAugment, detection_transforms

# batched classification augmentations that move pixels without boxes (or mix labels): refused, not ignored
REFUSED = ("crop_padding", "resized_crop_scale", "rotate", "translate", "shear", "hue", "cutout", "mixup", "cutmix")

_EPOCH_MIX = 1_000_003  # the classification loaders' (seed, epoch) mixing, kept the same
FASHION_DET_CONFIG = FashionDetConfig()  # the canvases --data fashion_det trains on (see fashion_det.py)


def _augment(config: DataConfig) -> JointAugment:
    default = DataConfig()
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (scale may be a list)
    refused = [n for n in REFUSED if norm(getattr(config, n)) != norm(getattr(default, n))]
    if refused:
        raise CnnlabError(f"data.{', data.'.join(refused)} do not apply to detection data (they would move the "
                          "pixels without the boxes, or mix labels); use data.flip, data.vflip, data.scale and "
                          "data.jitter")
    scale = tuple(config.scale)
    return JointAugment(hflip=0.5 if config.flip else 0.0, vflip=0.5 if config.vflip else 0.0,
                        photometric=0.5 if config.jitter else 0.0, scale=None if scale == (1.0, 1.0) else scale)


def _local_batch(batch_size: int, world_size: int) -> int:
    """Images per step on one of ``world_size`` processes: the configured batch is the global one."""
    if batch_size % world_size:
        raise CnnlabError(f"data.batch_size={batch_size} is the global batch and must divide evenly over "
                          f"{world_size} processes: use a multiple of {world_size}")
    return batch_size // world_size


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * _EPOCH_MIX + epoch


class SeededItems(Dataset):
    """Items of ``dataset`` with the global RNG seeded by ``(seed, epoch, index)`` while each is made, so the
    random augmentation of an item does not depend on the worker that makes it or on what ran before."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((_epoch_seed(self.seed, self.epoch) * 7_919 + i) % (2 ** 63))
            return self.dataset[i]


class DetectionBatches:
    """DataLoader batches of ``(images, targets)`` moved to ``device``; ``set_epoch`` fixes order and augmentation.

    Args:
        dataset: a map-style detection dataset; batch_size: images per batch; shuffle: training order;
        num_workers: DataLoader workers; device: where batches go; seed: base of the per-epoch seeds.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device,
                 seed: int, drop_last: bool = False) -> None:
        self.items = SeededItems(dataset, seed)
        self.device, self.seed, self.epoch = device, seed, 0
        self.generator = torch.Generator().manual_seed(_epoch_seed(seed, 0))
        # workers are made anew each epoch (not persistent), so they see the epoch set on ``items``
        self.loader = DataLoader(self.items, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                 collate_fn=collate_detection, generator=self.generator, drop_last=drop_last,
                                 pin_memory=torch.device(device).type == "cuda")

    @property
    def dataset(self) -> Dataset:
        return self.items.dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.items.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        self.generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.items.epoch = self.epoch
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(self.epoch)
        for batch in self.loader:
            yield batch_to_device(batch, self.device)

    def shard(self, rank: int, world_size: int) -> DetectionBatches:
        """Rank ``rank``'s share of each epoch under torchrun: a ``DistributedSampler`` (seeded by the run's seed,
        reshuffled per epoch) and ``batch_size / world_size`` images per step, so the global batch is unchanged."""
        base = self.loader
        sharded = copy.copy(self)
        sampler = DistributedSampler(self.items, num_replicas=world_size, rank=rank,
                                     shuffle=isinstance(base.sampler, RandomSampler), seed=self.seed,
                                     drop_last=base.drop_last)
        sharded.loader = DataLoader(self.items, batch_size=_local_batch(base.batch_size, world_size), sampler=sampler,
                                    num_workers=base.num_workers, collate_fn=base.collate_fn,
                                    drop_last=base.drop_last, pin_memory=base.pin_memory)
        return sharded


class TensorShards:
    """What tensor-resident batch iterators share under torchrun (``images``, ``batch_size``, ``drop_last`` theirs):
    every rank draws the same epoch order (a CPU generator seeded by (seed, epoch)), the order is padded to a multiple
    of ``world_size`` by repeating its head, and rank ``rank`` takes every ``world_size``-th item from ``rank``, in
    steps of ``batch_size / world_size`` (the global batch is unchanged)."""

    rank, world_size = 0, 1  # shard() sets them under torchrun

    def shard(self, rank: int, world_size: int):
        """Rank ``rank``'s share under torchrun."""
        sharded = copy.copy(self)
        sharded.batch_size = _local_batch(self.batch_size, world_size)
        sharded.rank, sharded.world_size = rank, world_size
        return sharded

    def _shard_size(self) -> int:
        return -(-len(self.images) // self.world_size)

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _rank_order(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's items of the epoch's ``order`` (all of it in one process)."""
        if self.world_size == 1:
            return order
        padded = torch.cat([order, order[:self._shard_size() * self.world_size - len(order)]])
        return padded[self.rank::self.world_size]


class TensorDetectionBatches(TensorShards):
    """Batches of a tensor-resident detection set (``fashion_det``): grey canvases (N, S, S) uint8 on the
    device, sliced, flipped and expanded to 3 channels a batch at a time; no workers.

    Args:
        images: uint8 (N, S, S); boxes float32 (M, 4) and labels int64 (M,) of all canvases; offsets (N + 1,);
        batch_size; shuffle; hflip: probability of a horizontal flip per image; device; seed; drop_last;
        scale: ``(lo, hi)``: each canvas zoomed about its centre by a factor drawn in [lo, hi] (:func:`zoom`),
            the canvas size kept; None: no zoom.
    """

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor,
                 batch_size: int, shuffle: bool, hflip: float, device: torch.device, seed: int,
                 drop_last: bool = False, scale: tuple[float, float] | None = None) -> None:
        self.images, self.boxes, self.labels = images.to(device), boxes.to(device), labels.to(device)
        self.offsets = offsets.tolist()
        self.batch_size, self.shuffle, self.hflip, self.drop_last = batch_size, shuffle, hflip, drop_last
        self.device, self.seed, self.epoch, self.scale = device, seed, 0, scale

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))  # CPU: same on every device
        n, width = len(self.images), self.images.shape[-1]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        flips = (torch.rand(n, generator=gen) < self.hflip) if self.hflip else torch.zeros(n, dtype=torch.bool)
        if self.scale is not None:  # drawn after the flips, so a run without zoom sees the batches it always did
            lo, hi = self.scale
            zooms = (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()
        order = self._rank_order(order)  # the flips stay drawn per canvas, before sharding: ranks agree
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            x = self.images[idx].float().div_(255)
            images, targets = [], []
            for j, i in enumerate(idx):
                a, z = self.offsets[i], self.offsets[i + 1]
                img, boxes, labels = x[j], self.boxes[a:z], self.labels[a:z]
                if flips[i]:
                    img = img.flip(-1)
                    boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
                if self.scale is not None:
                    img, boxes, labels = zoom(img, boxes, labels, zooms[i])
                images.append(img.expand(3, *img.shape))
                targets.append({"boxes": boxes.clone(), "labels": labels.clone(), "image_id": i})
            yield images, targets


def zoom(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, factor: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (H, W) canvas zoomed about its centre by ``factor``, its size kept: resized to ``round(factor * H)`` x
    ``round(factor * W)`` (bilinear, antialiased), then centred (padded with 0, or cropped) at whole-pixel
    offsets, so the boxes move exactly (scaled by the size ratio, shifted by the offset). Boxes are clipped to
    the canvas and dropped, with their labels, when under 1 px wide or high (as ``SanitizeBoundingBoxes``).
    What ``data.scale`` does on the tensor-resident ``fashion_det``; written here rather than with
    ``transforms.v2.RandomAffine`` because these canvases are batched tensors on the device, not v2 items."""
    import torch.nn.functional as F
    from torchvision.ops import clip_boxes_to_image, remove_small_boxes

    h, w = image.shape[-2:]
    nh, nw = max(1, round(factor * h)), max(1, round(factor * w))
    if (nh, nw) == (h, w):
        return image, boxes, labels
    resized = F.interpolate(image[None, None], size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=nh < h or nw < w)[0, 0].clamp_(0, 1)
    out = image.new_zeros(h, w)
    dy, dx = (h - nh) // 2, (w - nw) // 2  # where the resized canvas's corner lands (negative: cropped)
    out[max(dy, 0):max(dy, 0) + min(nh, h), max(dx, 0):max(dx, 0) + min(nw, w)] = \
        resized[max(-dy, 0):max(-dy, 0) + min(nh, h), max(-dx, 0):max(-dx, 0) + min(nw, w)]
    moved = boxes * boxes.new_tensor([nw / w, nh / h, nw / w, nh / h]) + boxes.new_tensor([dx, dy, dx, dy])
    moved = clip_boxes_to_image(moved, (h, w))
    keep = remove_small_boxes(moved, 1.0)
    return out, moved[keep], labels[keep]


def _bundle(train: Any, val: Any, test: Any, classes: list[str], shape: tuple[int, int, int]) -> DataBundle:
    return DataBundle(train=train, val=val, test=test, classes=list(classes), input_shape=shape,
                      preprocess=None, preprocess_state={"kind": "none"})


def _build_fashion_det(config: DataConfig, device: torch.device, seed: int) -> DataBundle:
    splits = load_fashion_det(FASHION_DET_CONFIG, root=config.root, download=config.download)
    augment = _augment(config)
    extra = [n for n, on in (("jitter", augment.photometric), ("vflip", augment.vflip)) if on]
    if extra:
        raise CnnlabError(f"data.{', data.'.join(extra)} do not apply to fashion_det (grey canvases flipped and "
                          "zoomed on the device, their items upright); use data.flip and data.scale")
    hflip, scale = augment.hflip, augment.scale

    def wrap(c: Any, train: bool) -> TensorDetectionBatches:
        n = min(config.train_limit, len(c)) if train and config.train_limit else len(c)
        m = int(c.offsets[n])
        bs = config.batch_size if train else config.eval_batch_size
        return TensorDetectionBatches(torch.from_numpy(c.images[:n]), torch.from_numpy(c.boxes[:m]),
                                      torch.from_numpy(c.labels[:m]), torch.from_numpy(c.offsets[:n + 1]), bs,
                                      shuffle=train, hflip=hflip if train else 0.0, device=device, seed=seed,
                                      drop_last=train and n > bs, scale=scale if train else None)

    size = splits["train"].images.shape[-1]
    return _bundle(wrap(splits["train"], True), wrap(splits["val"], False), wrap(splits["test"], False),
                   FASHION_CLASSES, (3, size, size))


def _loaders(config: DataConfig, device: torch.device, seed: int, train_set: Dataset, val_set: Dataset | None,
             test_set: Dataset, classes: list[str], shape: tuple[int, int, int]) -> DataBundle:
    if config.train_limit:
        train_set = torch.utils.data.Subset(train_set, range(min(config.train_limit, len(train_set))))
    if len(train_set) == 0:
        raise CnnlabError(f"data.name={config.name!r}: the training split is empty")
    bs, workers = config.batch_size, config.num_workers
    train = DetectionBatches(train_set, bs, True, workers, device, seed, drop_last=len(train_set) > bs)
    val = DetectionBatches(val_set, config.eval_batch_size, False, workers, device, seed) if val_set else None
    test = DetectionBatches(test_set, config.eval_batch_size, False, workers, device, seed)
    return _bundle(train, val, test, classes, shape)


def _build_trees(config: DataConfig, device: torch.device, seed: int) -> DataBundle:
    from cnnlab.data.trees import CLASSES, TreeCrowns, load_trees

    splits = load_trees(config.root, config.download)
    augment = _augment(config)
    train = TreeCrowns(splits["train"], detection_transforms(augment, train=True))
    val = TreeCrowns(splits["val"], detection_transforms(augment, train=False))
    test = TreeCrowns(splits["test"], detection_transforms(augment, train=False))
    return _loaders(config, device, seed, train, val, test, CLASSES, (3, *splits["train"][0][0].shape[-2:]))


def _rule_split(n: int, source: str) -> dict[str, list[int]]:
    """The fallback split of n items in order: i % 10 == 4 val, i % 10 == 9 test, the rest train."""
    if n < 10:
        raise CnnlabError(f"{source}: {n} images are too few for the rule split (every 10th image val and "
                          "test, needs >= 10); give split files (VOC: ImageSets/Main/{train,val}.txt; COCO: "
                          "*train*.json beside *val*.json)")
    return {"train": [i for i in range(n) if i % 10 not in (4, 9)], "val": [i for i in range(n) if i % 10 == 4],
            "test": [i for i in range(n) if i % 10 == 9]}


def _shape_of(records: list[Any]) -> tuple[int, int, int]:
    from cnnlab.data.folder import read_image

    rec = records[0]
    if rec.height is not None and rec.width is not None:
        return (3, rec.height, rec.width)
    return (3, *read_image(rec.path, 3, None).shape[-2:])


def _build_voc(config: DataConfig, device: torch.device, seed: int, root: Path) -> DataBundle:
    ann = root / "Annotations"
    if not ann.is_dir():
        raise CnnlabError(f"voc:{root}: no Annotations/ folder (expected Annotations/*.xml, JPEGImages/ and "
                          "optionally ImageSets/Main/{train,val,test}.txt)")
    classes = voc_class_names(sorted(ann.glob("*.xml")))
    if not classes:
        raise CnnlabError(f"voc:{root}: no <object><name> in {ann}/*.xml; a detection set needs boxes")
    augment = _augment(config)
    main = root / "ImageSets" / "Main"
    files = {s: main / f"{s}.txt" for s in ("train", "trainval", "val", "test")}

    def dataset(split: str | None, train: bool, keep: list[int] | None = None) -> VOCDetection:
        ds = VOCDetection(root, split=split, classes=classes, transforms=detection_transforms(augment, train))
        if keep is not None:
            ds.records = [ds.records[i] for i in keep]
        drop_degenerate_boxes(ds.records, f"voc:{root} ({split or 'all'})")
        return ds

    train_name = "train" if files["train"].is_file() else "trainval" if files["trainval"].is_file() else None
    if train_name is not None:
        if files["val"].is_file():
            train_set, val_set = dataset(train_name, True), dataset("val", False)
        else:  # only a training list: its own rule split gives val and test
            rule = _rule_split(len(read_split(files[train_name])), str(files[train_name]))
            train_set = dataset(train_name, True, rule["train"])
            val_set = dataset(train_name, False, rule["val"])
        test_set = dataset("test", False) if files["test"].is_file() else val_set
    else:
        rule = _rule_split(len(list(ann.glob("*.xml"))), f"voc:{root}")
        train_set, val_set, test_set = (dataset(None, s == "train", rule[s]) for s in ("train", "val", "test"))
    return _loaders(config, device, seed, train_set, val_set if len(val_set) else None, test_set, classes,
                    _shape_of(train_set.records))


def _coco_image_root(path: Path) -> Path:
    """Images named relative to the JSON's folder, or to ``images/`` beside it (the first one decides)."""
    import json

    try:
        first = next(iter(json.loads(path.read_text(encoding="utf-8")).get("images", [])), None)
    except (OSError, ValueError, AttributeError):
        return path.parent  # read_coco reports what is wrong with the file
    name = first.get("file_name") if isinstance(first, dict) else None
    if isinstance(name, str) and not (path.parent / name).is_file() and (path.parent / "images" / name).is_file():
        return path.parent / "images"
    return path.parent


def _build_coco(config: DataConfig, device: torch.device, seed: int, path: Path) -> DataBundle:
    if not path.is_file():
        raise CnnlabError(f"coco:{path} does not exist (expected coco:PATH/annotations.json)")
    augment = _augment(config)

    def dataset(p: Path, train: bool, keep: list[int] | None = None) -> CocoDetection:
        ds = CocoDetection(p, _coco_image_root(p), transforms=detection_transforms(augment, train))
        if keep is not None:
            ds.records = [ds.records[i] for i in keep]
        drop_degenerate_boxes(ds.records, p)
        return ds

    # instances_train2017.json beside instances_val2017.json: the files are the splits
    siblings = {s: path.with_name(path.name.replace("train", s)) for s in ("val", "test")} \
        if "train" in path.name else {}
    if siblings and siblings["val"].is_file():
        train_set, val_set = dataset(path, True), dataset(siblings["val"], False)
        test_set = dataset(siblings["test"], False) if siblings["test"].is_file() else val_set
        for other in (val_set, test_set):
            if other.classes != train_set.classes:
                raise CnnlabError(f"{other.annotation_file}: categories {other.classes} differ from {path}'s "
                                  f"{train_set.classes}; the splits must share one label set")
    else:
        probe = CocoDetection(path, _coco_image_root(path))
        rule = _rule_split(len(probe), f"coco:{path}")
        train_set, val_set, test_set = (dataset(path, s == "train", rule[s]) for s in ("train", "val", "test"))
    return _loaders(config, device, seed, train_set, val_set if len(val_set) else None, test_set,
                    train_set.classes, _shape_of(train_set.records))


def build_detection_data(config: DataConfig, device: torch.device, *, seed: int = 0) -> DataBundle:
    """The detection bundle for ``config.name`` (``fashion_det``, ``trees``, ``voc:PATH``, ``coco:FILE``).

    Args:
        config: the data section (``batch_size``, ``eval_batch_size``, ``num_workers``, ``flip``, ``vflip``,
            ``scale``, ``jitter``, ``train_limit``, ``root`` (cache folder of the named sets), ``download``,
            ``eval_tile``/``eval_tile_overlap``: evaluation by tiles, recorded on the bundle as ``eval_tiles``).
        device: where batches go.
        seed: base of the per-epoch shuffling and augmentation seeds.
    """
    device = torch.device(device)
    name = config.name
    if config.eval_tile:
        check_tiling(config.eval_tile, config.eval_tile_overlap, ("data.eval_tile", "data.eval_tile_overlap"))
    if name == "fashion_det":
        bundle = _build_fashion_det(config, device, seed)
    elif name == "trees":
        bundle = _build_trees(config, device, seed)
    elif name.startswith("voc:"):
        bundle = _build_voc(config, device, seed, Path(name[4:]).expanduser())
    elif name.startswith("coco:"):
        bundle = _build_coco(config, device, seed, Path(name[5:]).expanduser())
    else:
        raise CnnlabError(f"unknown detection data {name!r} (expected fashion_det, trees, voc:PATH or "
                          "coco:PATH/annotations.json)")
    if config.eval_tile:
        bundle.eval_tiles = (int(config.eval_tile), float(config.eval_tile_overlap))
    return bundle
