"""Augmentation done on whole batches of tensors, on the training device (no per-sample Python).

Every transform is called as ``x, y = t(x, y, generator)`` with ``x`` float (B, C, H, W) in
[0, 1] before normalisation and ``y`` int labels (B,) or soft labels (B, K). Randomness comes
only from the generator passed in, so a seeded run is repeatable and resumable.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlab._errors import CnnlabError


class LabelChangeWarning(UserWarning):
    """An augmentation can turn an image into another class (a 6 rotated by 180 degrees is a 9)."""


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device)


def _uniform(gen: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * _rand(gen, n, device=device)


class BatchTransform:
    """Base class; ``label_risk`` says why this transform may change the label of orientation-sensitive classes."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def label_risk(self) -> str | None:
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@dataclass(repr=False)
class RandomFlip(BatchTransform):
    """Flip each image with probability ``p``, horizontally (left-right) or vertically (up-down)."""

    p: float = 0.5
    vertical: bool = False

    def __call__(self, x, y, gen):
        flip = _rand(gen, x.shape[0], device=x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(2 if self.vertical else 3), x), y

    def label_risk(self):
        return "vertical flips turn a 6 into a 9-like shape" if self.vertical else None


@dataclass(repr=False)
class RandomCrop(BatchTransform):
    """Pad by ``padding`` pixels (zeros or reflection) and take a random crop of the original size."""

    padding: int = 4
    mode: str = "constant"

    def __call__(self, x, y, gen):
        b, c, h, w = x.shape
        p = self.padding
        xp = F.pad(x, (p, p, p, p), mode=self.mode)
        oy = (_rand(gen, b, device=x.device) * (2 * p + 1)).long()
        ox = (_rand(gen, b, device=x.device) * (2 * p + 1)).long()
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C): one gather for the whole batch
        return out.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x)), y


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else torch.contiguous_format


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample every image of the batch through its own 2x3 affine matrix (output -> input coords)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(repr=False)
class RandomAffine(BatchTransform):
    """Random rotation (degrees), translation (fraction of size), scale and shear (degrees), with probability ``p``."""

    degrees: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    p: float = 1.0

    def __call__(self, x, y, gen):
        b, dev = x.shape[0], x.device
        angle = torch.deg2rad(_uniform(gen, b, -self.degrees, self.degrees, dev))
        shear = torch.deg2rad(_uniform(gen, b, -self.shear, self.shear, dev))
        s = _uniform(gen, b, *self.scale, dev)
        t = _uniform(gen, 2 * b, -self.translate, self.translate, dev).view(b, 2) * 2  # grid units span 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        # forward map A = R(angle) @ Shear_x(shear) * s; affine_grid wants the inverse (output -> input)
        a = torch.stack([torch.stack([cos, cos * torch.tan(shear) - sin], -1),
                         torch.stack([sin, sin * torch.tan(shear) + cos], -1)], 1) * s[:, None, None]
        inv = torch.linalg.inv(a)
        theta = torch.cat([inv, -(inv @ t[:, :, None])], 2)
        out = _warp(x, theta)
        keep = _rand(gen, b, device=dev) >= self.p
        return torch.where(keep[:, None, None, None], x, out), y

    def label_risk(self):
        return f"rotations up to {self.degrees:g} degrees can turn a 6 into a 9" if self.degrees > 90 else None


@dataclass(repr=False)
class RandomResizedCrop(BatchTransform):
    """Crop a random box of ``scale`` area fraction and ``ratio`` aspect, resized back to the input size."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, x, y, gen):
        b, dev = x.shape[0], x.device
        area = _uniform(gen, b, *self.scale, dev)
        log_r = _uniform(gen, b, math.log(self.ratio[0]), math.log(self.ratio[1]), dev)
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)  # box size as a fraction of the image
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (_rand(gen, b, device=dev) * 2 - 1) * (1 - w)  # box centre in grid units, box stays inside
        cy = (_rand(gen, b, device=dev) * 2 - 1) * (1 - h)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1)
        return _warp(x, theta), y


@dataclass(repr=False)
class ColorJitter(BatchTransform):
    """Random brightness, contrast and (colour images) saturation factors in [1 - v, 1 + v], and hue shifts.

    ``hue`` shifts each image's hue by a random fraction of the colour circle in [-hue, hue]
    (at most 0.5), through HSV exactly as ``torchvision.transforms.functional.adjust_hue`` does.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.hue <= 0.5:
            raise CnnlabError(f"hue jitter must be in [0, 0.5] (a fraction of the colour circle), got {self.hue}")

    def __call__(self, x, y, gen):
        b, dev = x.shape[0], x.device

        def factor(v: float) -> torch.Tensor:
            return _uniform(gen, b, 1 - v, 1 + v, dev).clamp(min=0).view(b, 1, 1, 1)

        if self.brightness:
            x = x * factor(self.brightness)
        if self.contrast:
            grey = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
            x = (x - grey.mean((1, 2, 3), keepdim=True)) * factor(self.contrast) + grey.mean((1, 2, 3), keepdim=True)
        if self.saturation and x.shape[1] == 3:
            r, g, b_ = x.unbind(1)
            grey = (0.299 * r + 0.587 * g + 0.114 * b_).unsqueeze(1)  # ITU-R 601 luma, as torchvision
            x = (x - grey) * factor(self.saturation) + grey
        if self.hue and x.shape[1] == 3:
            x = shift_hue(x.clamp(0, 1), _uniform(gen, b, -self.hue, self.hue, dev))
        return x.clamp(0, 1), y


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] (B, 3, H, W) by ``shift`` (B,) turns: RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe_delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    sat = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = ((h / 6.0 + shift.view(-1, 1, 1)) % 1.0) * 6.0
    # back to RGB: each channel is v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 for R, G, B
    k = (n + h.unsqueeze(1)) % 6.0
    v, s = maxc.unsqueeze(1), sat.unsqueeze(1)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


@dataclass(repr=False)
class Cutout(BatchTransform):
    """Zero one ``size`` x ``size`` square per image at a random centre (DeVries & Taylor 2017)."""

    size: int = 8
    p: float = 1.0

    def __call__(self, x, y, gen):
        b, _, h, w = x.shape
        dev = x.device
        cy = (_rand(gen, b, device=dev) * h).long()[:, None, None]
        cx = (_rand(gen, b, device=dev) * w).long()[:, None, None]
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        top, left = cy - self.size // 2, cx - self.size // 2  # the square may stick out of the image
        hole = (ys >= top) & (ys < top + self.size) & (xs >= left) & (xs < left + self.size)
        hole &= (_rand(gen, b, device=dev) < self.p)[:, None, None]
        return x.masked_fill(hole[:, None], 0.0), y


def _soft(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return y if y.ndim == 2 else F.one_hot(y, num_classes).to(dtype)


def _beta(gen: torch.Generator, alpha: float, device: torch.device) -> torch.Tensor:
    # Beta(a, a) from two Gamma draws, taken from the generator so runs are repeatable; a 0-d
    # tensor on the device, never a Python float: reading it back would stall a GPU every batch
    g = torch._standard_gamma(torch.full((2,), alpha, device=device), generator=gen)
    return g[0] / g.sum()


@dataclass(repr=False)
class Mixup(BatchTransform):
    """Mixup (Zhang et al. 2018): x = l*x_i + (1-l)*x_j, labels mixed with the same l ~ Beta(alpha, alpha)."""

    num_classes: int
    alpha: float = 0.2

    def __call__(self, x, y, gen):
        lam = _beta(gen, self.alpha, x.device)
        perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
        t = _soft(y, self.num_classes, x.dtype)
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


@dataclass(repr=False)
class CutMix(BatchTransform):
    """CutMix (Yun et al. 2019): paste a box of x_j into x_i; labels mixed by the pasted area."""

    num_classes: int
    alpha: float = 1.0

    def __call__(self, x, y, gen):
        b, _, h, w = x.shape
        dev = x.device
        lam = _beta(gen, self.alpha, dev)
        perm = torch.randperm(b, generator=gen, device=dev)
        # one box for the whole batch, kept on the device as a mask (no host round trip)
        side = (1 - lam).sqrt()
        half_h, half_w = (h * side).floor() // 2, (w * side).floor() // 2
        centre = _rand(gen, 2, device=dev)
        cy, cx = (centre[0] * h).floor(), (centre[1] * w).floor()
        rows, cols = torch.arange(h, device=dev).view(h, 1), torch.arange(w, device=dev).view(1, w)
        box = (rows >= cy - half_h) & (rows < cy + half_h) & (cols >= cx - half_w) & (cols < cx + half_w)
        out = torch.where(box, x[perm], x)
        area = box.float().mean()  # the label weight is the area actually pasted (the box is clipped)
        t = _soft(y, self.num_classes, x.dtype)
        return out, (1 - area) * t + area * t[perm]


class Compose(BatchTransform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[BatchTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x, y, gen):
        for t in self.transforms:
            x, y = t(x, y, gen)
        return x, y

    def label_risk(self):
        risks = [r for t in self.transforms if (r := t.label_risk())]
        return "; ".join(risks) or None

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def warn_label_changes(transform: BatchTransform, dataset: str, orientation_matters: bool) -> None:
    """Warn (LabelChangeWarning) when ``transform`` can change the class of an orientation-sensitive dataset."""
    risk = transform.label_risk()
    if orientation_matters and risk:
        warnings.warn(f"augmentation on {dataset} may change labels: {risk}", LabelChangeWarning, stacklevel=2)


def check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise CnnlabError(f"{name} must be a probability in [0, 1], got {p}")
