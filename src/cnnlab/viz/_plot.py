"""Image-to-array conversion for the viz figures (``pyplot`` is cnnlab._plot's, re-exported here)."""
from __future__ import annotations

import numpy as np
import torch

from cnnlab._plot import pyplot

__all__ = ["pyplot", "stretch", "to_display"]


def to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 or float image -> (H, W, 3) or (H, W) float array in [0, 1] for ``imshow``."""
    x = image.detach().to("cpu", torch.float32)
    if image.dtype == torch.uint8:
        x = x / 255
    elif x.numel() and (x.min() < 0 or x.max() > 1):  # e.g. a normalised input: stretch to [0, 1] for display
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    if x.ndim == 3 and x.shape[0] == 3:
        return x.permute(1, 2, 0).numpy()
    return x[0].numpy() if x.ndim == 3 else x.numpy()  # one channel (or the first of C != 3): shown grey


def stretch(x: torch.Tensor) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant map becomes zeros) for a grey feature-map display."""
    x = x.detach().to("cpu", torch.float32)
    span = (x.max() - x.min()).item() if x.numel() else 0.0
    return ((x - x.min()) / span).numpy() if span > 0 else torch.zeros_like(x).numpy()
