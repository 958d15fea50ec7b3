"""Filters and the feature maps they make: the notes' two 7x7 line filters, and a model's learned first layer.

The notes (Géron, *Hands-On Machine Learning*, ch. 14, "TensorFlow implementation")::

    filters = np.zeros(shape=(7, 7, channels, 2), dtype=np.float32)
    filters[:, 3, :, 0] = 1  # vertical line
    filters[3, :, :, 1] = 1  # horizontal line
    outputs = tf.nn.conv2d(images, filters, strides=1, padding="SAME")

TensorFlow stores filters as (H, W, C_in, C_out); PyTorch as (C_out, C_in, H, W). Both compute
a cross-correlation, so the same numbers give the same maps.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab._plot import save_figure
from cnnlab.viz._plot import pyplot, stretch, to_display

LINE_FILTER_NAMES = ("vertical line", "horizontal line")


def line_filters(size: int = 7, channels: int = 3) -> torch.Tensor:
    """The notes' two filters, (2, channels, size, size): a vertical and a horizontal line of ones through the centre."""
    if size < 1 or channels < 1:
        raise CnnlabError(f"line_filters needs size >= 1 and channels >= 1, got size={size}, channels={channels}")
    filters = torch.zeros(2, channels, size, size)
    centre = size // 2  # column/row 3 of a 7x7 filter, as in the notes
    filters[0, :, :, centre] = 1  # notes: filters[:, 3, :, 0] = 1 (every row, column 3, every channel)
    filters[1, :, centre, :] = 1  # notes: filters[3, :, :, 1] = 1 (row 3, every column, every channel)
    return filters


def apply_filters(images: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Stride-1 'same' convolution (cross-correlation) of images with filters: (B, C, H, W) -> (B, F, H, W).

    uint8 images are scaled to [0, 1] first, as the notes' ``load_sample_image(...) / 255``.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or filters.ndim != 4:
        raise CnnlabError(f"apply_filters needs images (B, C, H, W) and filters (F, C, kH, kW); "
                          f"got {tuple(images.shape)} and {tuple(filters.shape)}")
    if images.shape[1] != filters.shape[1]:
        raise CnnlabError(f"the filters have {filters.shape[1]} input channels, the images have {images.shape[1]}; "
                          f"build filters with channels={images.shape[1]}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return F.conv2d(x, filters.to(x), stride=1, padding="same")


def plot_filter_responses(path: str | os.PathLike, images: Sequence[torch.Tensor], maps: Sequence[torch.Tensor],
                          image_names: Sequence[str] = (), filter_names: Sequence[str] = LINE_FILTER_NAMES,
                          filters: torch.Tensor | None = None) -> Path:
    """One row per image: the original, then each feature map in grey (as the notes' ``cmap="gray"``).

    ``maps[i]`` is image i's (F, H, W) response (a (B, F, H, W) tensor works too).

    ``filters`` (F, C, kH, kW), when given, adds a top row showing each filter (channel mean).
    """
    plt = pyplot()
    rows, cols = len(images) + (filters is not None), 1 + max(len(m) for m in maps)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    offset = 0
    if filters is not None:
        offset = 1
        axes[0, 0].text(0.5, 0.5, "filters\n(white = 1)", ha="center", va="center", transform=axes[0, 0].transAxes)
        for j, f in enumerate(filters):
            axes[0, j + 1].imshow(f.float().mean(0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[0, j + 1].set_title(f"{filter_names[j] if j < len(filter_names) else f'filter {j}'} "
                                     f"{f.shape[-2]}x{f.shape[-1]}", fontsize=9)
    for i, image in enumerate(images):
        ax = axes[i + offset, 0]
        ax.imshow(to_display(image), cmap="gray" if image.shape[0] == 1 else None)
        ax.set_title(image_names[i] if i < len(image_names) else f"image {i}", fontsize=9)
        for j in range(len(maps[i])):
            axes[i + offset, j + 1].imshow(stretch(maps[i][j]), cmap="gray")
            if filters is None:
                axes[i + offset, j + 1].set_title(filter_names[j] if j < len(filter_names) else f"map {j}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` registered in ``model`` (its stem) and its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise CnnlabError(f"{type(model).__name__} has no Conv2d layer whose filters could be shown")


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """The learned kernels of the first conv layer, (C_out, C_in / groups, kH, kW), detached on the CPU."""
    return first_conv(model)[1].weight.detach().to("cpu", torch.float32).clone()


def plot_first_layer_filters(path: str | os.PathLike, model: nn.Module, title: str = "", max_filters: int = 64) -> Path:
    """A grid of the first layer's kernels: RGB when they see 3 channels, else the channel mean in grey.

    Each kernel is scaled on its own to [0, 1] (as AlexNet's and ZFNet's filter figures), so the
    shape of a filter shows, not its norm.
    """
    name, conv = first_conv(model)
    weights = first_layer_filters(model)[:max_filters]
    n = len(weights)
    cols = min(8, n)
    rows = -(-n // cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, w in zip(axes.flat, weights):
        w = w if w.shape[0] == 3 else w.mean(0, keepdim=True)
        ax.imshow(to_display(torch.from_numpy(stretch(w))), cmap="gray" if w.shape[0] == 1 else None,
                  interpolation="nearest")
    shown = f"{n} of {conv.out_channels}" if n < conv.out_channels else f"{n}"
    fig.suptitle(f"{title + ': ' if title else ''}{shown} filters of {name} "
                 f"({conv.in_channels}->{conv.out_channels}, {conv.kernel_size[0]}x{conv.kernel_size[1]})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
