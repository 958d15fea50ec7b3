"""Preprocessing fitted on the training split: per-channel mean/std normalisation and PCA/ZCA whitening."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cnnlab._errors import CnnlabError


@dataclass
class Normalize:
    """``(x - mean) / std`` per channel, with statistics of the training images only (never the test set).

    Args:
        mean, std: one value per channel, for images scaled to [0, 1].
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    _stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, images: torch.Tensor, chunk: int = 8192) -> Normalize:
        """Per-channel mean and std of uint8 (N, C, H, W) images, accumulated in float64 chunks."""
        if images.ndim != 4 or len(images) == 0:
            raise CnnlabError(f"Normalize.fit needs a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        total = torch.zeros(images.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk].to("cpu", torch.float64) / 255
            total += x.sum((0, 2, 3))
            squares += (x * x).sum((0, 2, 3))
        count = images.numel() / images.shape[1]
        mean = total / count
        std = (squares / count - mean * mean).clamp(min=1e-12).sqrt()
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def _constants(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != len(self.mean):
            raise CnnlabError(f"Normalize has {len(self.mean)} channels, the images have {x.shape[1]}")
        key = (x.device, x.dtype)
        if key not in self._stats:  # a new tensor per batch would be a blocking host-to-GPU copy each time
            self._stats[key] = tuple(torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1).to(x.device) for v in (self.mean, self.std))
        return self._stats[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._constants(x)
        return (x - mean) / std

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """``x * std + mean``: the images in [0, 1] scale that a normalised batch came from."""
        mean, std = self._constants(x)
        return x * std + mean


@dataclass
class PCAWhiten:
    """PCA whitening of flattened images: decorrelated features with unit variance.

    ``zca=True`` rotates back into pixel space (ZCA, Bell & Sejnowski 1997), so the result is
    still an image; ``eps`` regularises small eigenvalues.

    Args:
        mean: (D,) pixel means of the training images.
        matrix: (D, D) whitening matrix W, applied as (x - mean) @ W.
    """

    mean: torch.Tensor
    matrix: torch.Tensor
    shape: tuple[int, int, int]

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 1e-2, zca: bool = True, max_images: int = 20000) -> PCAWhiten:
        """Fit on uint8 (N, C, H, W) images (at most ``max_images`` of them, chosen at random with a fixed seed)."""
        if images.ndim != 4:
            raise CnnlabError(f"PCAWhiten.fit needs (N, C, H, W) images, got shape {tuple(images.shape)}")
        if len(images) > max_images:  # a random subset: files are often sorted by class
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
            images = images[keep]
        x = images.to("cpu", torch.float64).flatten(1) / 255
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (len(x) - 1)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = eigvec / torch.sqrt(eigval + eps)  # columns scaled: PCA whitening
        if zca:
            w = w @ eigvec.T
        return cls(mean.float(), w.float(), tuple(images.shape[1:]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise CnnlabError(f"PCAWhiten was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")
        flat = (x.flatten(1) - self.mean.to(x)) @ self.matrix.to(x)
        return flat.view(x.shape)
