"""Region proposals for the classic two-stage detectors (R-CNN, SPP-net, Fast R-CNN).

Those detectors do not propose boxes themselves: an external method hands them about 2,000 class-agnostic
regions per image, which they classify and refine. Two methods here:

- :func:`selective_search` (Uijlings et al. 2013), the method the three papers used, through OpenCV
  contrib's ``cv2.ximgproc.segmentation`` ("fast" and "quality" modes). It needs the optional extra
  ``pip install cnnlab[detection]`` (``opencv-contrib-python-headless``); it is imported only when called.
- :func:`grid_proposals`, dependency-free and image-independent: sliding windows of several sizes and
  aspect ratios over the image, each size stepped by a fixed fraction of itself, so that any box whose size
  lies between the smallest and the largest window overlaps some window well. It is what tests and quick
  runs use; it knows nothing about the image, so it needs more boxes than selective search for the same recall.

:class:`RegionProposer` is the stage the models hold: a :class:`ProposalConfig` picks the method, and a
cache (a dict from a hash of the image's pixels to its boxes) means an epoch over a training set computes
each image's proposals once. Selective search costs about 0.1-2 s per image on a CPU (most of Fast R-CNN's
2.3 s per image in the paper), so the cache is what makes several epochs affordable.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import math
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from cnnlab._errors import CnnlabError

__all__ = ["ProposalConfig", "RegionProposer", "grid_proposals", "selective_search", "PROPOSAL_METHODS"]

PROPOSAL_METHODS = ("selective_search_fast", "selective_search_quality", "grid")
_MISSING_CV2 = ("selective search needs OpenCV's contrib modules (cv2.ximgproc): pip install "
                "opencv-contrib-python-headless (or pip install 'cnnlab[detection]'); "
                "or use the dependency-free proposals='grid'")


def _import_ximgproc():
    """OpenCV contrib's ximgproc module, or a CnnlabError saying what to install."""
    try:
        cv2 = importlib.import_module("cv2")
    except ImportError as error:
        raise CnnlabError(_MISSING_CV2) from error
    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is None:  # plain opencv-python (no contrib) is installed
        raise CnnlabError(f"the installed OpenCV ({getattr(cv2, '__version__', '?')}) has no ximgproc module; "
                          + _MISSING_CV2)
    return cv2, ximgproc


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search ranks with; a no-op where it is not found."""
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
    except (OSError, AttributeError):  # an unusual platform: the ranking stays OpenCV's unseeded one
        pass


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise CnnlabError(f"proposals expect an image tensor of shape (3, H, W) (or (1, H, W)) with values in 0..1, "
                          f"got {shape}")


def _finish(boxes: Tensor, image_size: tuple[int, int], max_proposals: int, min_size: float) -> Tensor:
    """Clip to the image, drop boxes thinner than ``min_size`` pixels and duplicates, keep the first ``max_proposals``."""
    boxes = clip_boxes_to_image(boxes, image_size)
    boxes = boxes[remove_small_boxes(boxes, min_size)]
    if boxes.numel():
        # unique() sorts; keep the first occurrence of each box so the method's ranking survives
        _, inverse = torch.unique(boxes, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), boxes.shape[0], dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(boxes.shape[0]), reduce="amin")
        boxes = boxes[first.sort().values]
    if boxes.shape[0] == 0:  # never return nothing: the whole image is a region too
        boxes = torch.tensor([[0.0, 0.0, float(image_size[1]), float(image_size[0])]])
    return boxes[:max_proposals]


def selective_search(
    image: Tensor,
    mode: str = "fast",
    max_proposals: int = 2000,
    *,
    max_side: int | None = None,
    min_size: float = 2.0,
    seed: int | None = 0,
) -> Tensor:
    """Selective search proposals (Uijlings et al. 2013) of one image, in OpenCV's ranking, as xyxy boxes.

    Args:
        image: (3, H, W) (or (1, H, W)) floats in 0..1, on any device.
        mode: ``"fast"`` (``switchToSelectiveSearchFast``: 2 colour spaces, 2 strategies; the R-CNN papers' setting)
            or ``"quality"`` (``switchToSelectiveSearchQuality``: more segmentations, more boxes, several times slower).
        max_proposals: the most boxes returned (R-CNN uses about 2,000).
        max_side: when set, the image is first shrunk so its longer side is at most this (the search's cost grows
            with the pixels; boxes are scaled back); None searches the image as given.
        min_size: boxes narrower or shorter than this many pixels are dropped.
        seed: OpenCV ranks the regions by hierarchy level times a draw of the C library's ``rand()`` (Uijlings et
            al.'s pseudo-random ranking), so which boxes survive ``max_proposals`` varies from call to call; an int
            seeds that generator first (``srand`` through ctypes, process-wide, where the C library is found) so the
            ranking is reproducible; None leaves it alone.
    Returns:
        (N, 4) float32 x1, y1, x2, y2 in the input image's pixels (on the image's device), 1 <= N <= max_proposals.
    """
    _check_image(image)
    if mode not in ("fast", "quality"):
        raise CnnlabError(f"selective search mode must be 'fast' or 'quality', got {mode!r}")
    if max_proposals < 1:
        raise CnnlabError(f"max_proposals must be >= 1, got {max_proposals}")
    cv2, ximgproc = _import_ximgproc()
    height, width = image.shape[-2:]
    scale = 1.0
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        image = torch.nn.functional.interpolate(image[None].float(), scale_factor=scale, mode="bilinear",
                                                align_corners=False, recompute_scale_factor=False)[0]
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    # (3, H, W) RGB floats -> (H, W, 3) BGR uint8, the layout OpenCV's segmentation expects
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).flip(0).permute(1, 2, 0)
    search = ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(pixels.contiguous().cpu().numpy())
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    if seed is not None:
        _seed_c_rand(seed)
    rects = torch.as_tensor(search.process(), dtype=torch.float32).reshape(-1, 4)  # (N, 4) x, y, w, h
    boxes = torch.cat((rects[:, :2], rects[:, :2] + rects[:, 2:]), dim=1) / scale
    return _finish(boxes, (height, width), max_proposals, min_size).to(image.device)


def grid_proposals(
    image_size: tuple[int, int],
    scales: Sequence[float] = (0.1, 0.2, 0.35, 0.55, 0.8),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    step: float = 0.25,
    max_proposals: int = 2000,
    *,
    min_size: float = 2.0,
) -> Tensor:
    """Multi-scale sliding windows: a dependency-free, image-independent proposal method.

    A window of scale ``s`` and ratio ``r`` (height / width, as torchvision's anchors) has area
    ``(s * sqrt(H * W))**2``; windows of one shape are laid on a grid whose step is ``step`` times the window's
    width and height, anchored so that the grid is centred on the image. With ``step = 0.25`` every box of a
    listed shape lying inside the image has a window with IoU >= 0.62 (``o / (2 - o)`` with
    ``o = (1 - step / 2)**2`` at worst, before any thinning). When there are more than ``max_proposals``
    windows, every scale and ratio keeps an even share (the largest windows are the fewest, so they are kept whole first).

    Args:
        image_size: (height, width) in pixels.
        scales: window sizes as fractions of ``sqrt(H * W)``.
        ratios: window aspect ratios, height / width.
        step: the grid step in units of the window's size (smaller: more windows, better overlap).
        max_proposals: the most boxes returned.
        min_size: windows thinner than this many pixels after clipping are dropped.
    Returns:
        (N, 4) float32 x1, y1, x2, y2, 1 <= N <= max_proposals, largest windows first.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise CnnlabError(f"grid_proposals needs a positive (height, width), got {tuple(image_size)}")
    if not scales or any(s <= 0 for s in scales) or not ratios or any(r <= 0 for r in ratios):
        raise CnnlabError(f"grid_proposals needs positive scales and ratios, got scales={tuple(scales)}, "
                          f"ratios={tuple(ratios)}")
    if not 0 < step <= 1:
        raise CnnlabError(f"grid_proposals step must be in (0, 1] (a fraction of the window size), got {step}")
    if max_proposals < 1:
        raise CnnlabError(f"max_proposals must be >= 1, got {max_proposals}")
    side = math.sqrt(height * width)
    groups: list[Tensor] = []
    for s in sorted(scales, reverse=True):
        for r in ratios:
            box_w = min(s * side / math.sqrt(r), float(width))
            box_h = min(s * side * math.sqrt(r), float(height))
            groups.append(_windows(height, width, box_w, box_h, step))
    # an even share per shape, the unused part of a small group's share passed on to the next ones
    kept, budget = [], max_proposals
    for i, group in enumerate(groups):
        share = budget // (len(groups) - i)
        if group.shape[0] > share:
            group = group[torch.linspace(0, group.shape[0] - 1, share).round().long()] if share else group[:0]
        kept.append(group)
        budget -= group.shape[0]
    return _finish(torch.cat(kept), (height, width), max_proposals, min_size)


def _windows(height: int, width: int, box_w: float, box_h: float, step: float) -> Tensor:
    """All windows of one size on a grid of ``step * size``, centred on the image: (N, 4) xyxy."""
    def starts(extent: int, size: float) -> Tensor:
        stride = max(step * size, 1.0)
        count = int(math.floor((extent - size) / stride + 1e-6)) + 1
        offset = (extent - size - (count - 1) * stride) / 2  # centre the grid: equal margins at both ends
        return offset + stride * torch.arange(count, dtype=torch.float32)

    xs, ys = starts(width, box_w), starts(height, box_h)
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return torch.stack((x0, y0, x0 + box_w, y0 + box_h), dim=1)


@dataclass(frozen=True)
class ProposalConfig:
    """Which proposals a classic two-stage detector gets, and how many.

    Args:
        method: ``"selective_search_fast"`` (the papers'), ``"selective_search_quality"`` or ``"grid"``
            (:func:`grid_proposals`, no dependency).
        max_proposals: per image, at most this many (2,000 in R-CNN and Fast R-CNN).
        max_side: selective search runs on the image shrunk to this longer side (None: as given).
        grid_scales, grid_ratios, grid_step: the windows of ``"grid"``.
        seed: seeds selective search's pseudo-random ranking (see :func:`selective_search`); None leaves it unseeded.
        cache: keep each image's proposals (keyed by a hash of its pixels) so they are computed once.
        cache_size: the most images kept (oldest dropped first); None keeps all (about 32 kB per image at 2,000 boxes).
    """

    method: str = "selective_search_fast"
    max_proposals: int = 2000
    max_side: int | None = 500
    grid_scales: tuple[float, ...] = (0.1, 0.2, 0.35, 0.55, 0.8)
    grid_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    grid_step: float = 0.25
    seed: int | None = 0
    cache: bool = True
    cache_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in PROPOSAL_METHODS:
            raise CnnlabError(f"unknown proposal method {self.method!r}; expected one of {', '.join(PROPOSAL_METHODS)}")
        if self.max_proposals < 1:
            raise CnnlabError(f"ProposalConfig.max_proposals must be >= 1, got {self.max_proposals}")

    @classmethod
    def of(cls, value: ProposalConfig | str | dict | None) -> ProposalConfig:
        """A config from a method name (``"grid"``), a dict of fields, a config, or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, ProposalConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise CnnlabError(f"unknown ProposalConfig fields {sorted(unknown)}; expected some of "
                                  f"{sorted(cls.__dataclass_fields__)}")
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        raise CnnlabError(f"proposals must be a method name ({', '.join(PROPOSAL_METHODS)}), a dict or a "
                          f"ProposalConfig, got {type(value).__name__}")


def image_key(image: Tensor) -> str:
    """A hash of an image's shape and pixels: the cache key (an augmented copy is a different image)."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(str((tuple(data.shape), str(data.dtype))).encode(), digest_size=16)
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class RegionProposer:
    """The proposal stage of R-CNN, SPP-net and Fast R-CNN: image -> (N, 4) boxes, cached per image.

    ``proposer(image)`` returns the boxes of one (3, H, W) image in its own pixels. With ``config.cache``, the
    boxes are kept in ``self.cache`` (an ordered dict from :func:`image_key` to a CPU tensor) so the next epoch
    reuses them; ``precompute(images)`` fills it ahead of training, and ``self.cache`` can be saved with
    ``torch.save`` and given back with ``cache=`` to skip the search in a later run. Not an ``nn.Module``:
    proposals are not parameters and are not part of a checkpoint.

    Args:
        config: a :class:`ProposalConfig`, a method name, or a dict of its fields.
        cache: an existing cache to start from (e.g. ``torch.load`` of a saved one).
    """

    def __init__(self, config: ProposalConfig | str | dict | None = None,
                 cache: dict[str, Tensor] | None = None) -> None:
        self.config = ProposalConfig.of(config)
        self.cache: OrderedDict[str, Tensor] = OrderedDict(cache or {})
        self.hits = 0
        self.misses = 0

    def propose(self, image: Tensor) -> Tensor:
        """The method's boxes for one image, uncached."""
        _check_image(image)
        cfg = self.config
        if cfg.method == "grid":
            return grid_proposals(tuple(image.shape[-2:]), cfg.grid_scales, cfg.grid_ratios, cfg.grid_step,
                                  cfg.max_proposals).to(image.device)
        mode = "fast" if cfg.method == "selective_search_fast" else "quality"
        return selective_search(image, mode, cfg.max_proposals, max_side=cfg.max_side, seed=cfg.seed)

    def __call__(self, image: Tensor) -> Tensor:
        if not self.config.cache:
            return self.propose(image)
        key = image_key(image)
        boxes = self.cache.get(key)
        if boxes is None:
            self.misses += 1
            boxes = self.propose(image).cpu()
            self.cache[key] = boxes
            if self.config.cache_size is not None and len(self.cache) > self.config.cache_size:
                self.cache.popitem(last=False)
        else:
            self.hits += 1
            self.cache.move_to_end(key)
        return boxes.to(image.device)

    def precompute(self, images) -> None:
        """Fill the cache for an iterable of (3, H, W) images (or of lists of them, as a detection loader yields)."""
        for item in images:
            if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
                item = item[0]  # an (images, targets) batch
            for image in item if isinstance(item, (list, tuple)) else [item]:
                self(image)

    def __repr__(self) -> str:
        return f"RegionProposer({self.config}, cached={len(self.cache)})"
