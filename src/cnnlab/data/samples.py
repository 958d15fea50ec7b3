"""scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``) for demos, and ``sample:NAME`` image arguments.

The notes (Géron ch. 14) apply their two 7x7 line filters to exactly these photos; scikit-learn
ships them inside its package, so no download is needed.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from cnnlab._errors import CnnlabError, did_you_mean

SAMPLE_NAMES = ("china", "flower")
SAMPLE_PREFIX = "sample:"


@lru_cache(maxsize=1)
def _load_samples() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise CnnlabError("the sample photos come with scikit-learn, which is not installed; "
                          "run `pip install cnnlab[data]`") from None
    return {name: load_sample_image(f"{name}.jpg") for name in SAMPLE_NAMES}  # (427, 640, 3) uint8 each


def sample_images() -> dict[str, torch.Tensor]:
    """``{"china": ..., "flower": ...}``: uint8 RGB tensors of shape (3, 427, 640)."""
    return {name: torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous() for name, array in _load_samples().items()}


def load_image_or_sample(spec: str | os.PathLike, channels: int | None = None,
                         size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file, or ``sample:china`` / ``sample:flower``, as uint8 (C, H, W).

    Args:
        spec: a file path or ``sample:NAME``.
        channels: 1 (greyscale) or 3 (RGB); None keeps a sample's 3 channels and reads a file as RGB.
        size: (H, W) to resize to (bilinear, as :func:`cnnlab.data.read_image`); None keeps the size.
    """
    from cnnlab.data.folder import read_image

    text = str(spec)
    if not text.startswith(SAMPLE_PREFIX):
        return read_image(spec, channels or 3, size)
    name = text[len(SAMPLE_PREFIX):].removesuffix(".jpg")
    if name not in SAMPLE_NAMES:
        raise CnnlabError(f"unknown sample image {name!r}{did_you_mean(name, SAMPLE_NAMES)} "
                          f"(the samples are {', '.join(SAMPLE_PREFIX + n for n in SAMPLE_NAMES)})")
    if channels not in (None, 1, 3):
        raise CnnlabError(f"images can be read with 1 or 3 channels, not {channels}")
    from PIL import Image

    img = Image.fromarray(_load_samples()[name])
    if channels == 1:
        img = img.convert("L")  # ITU-R 601 luma, as read_image does for files
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def image_label(spec: str | os.PathLike) -> str:
    """A short name for figure titles: the sample's name or the file's stem."""
    text = str(spec)
    return text[len(SAMPLE_PREFIX):] if text.startswith(SAMPLE_PREFIX) else os.path.splitext(os.path.basename(text))[0]
