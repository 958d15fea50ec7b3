"""Feature maps of any classifier at chosen stages, for one image: the most active channels per stage.

Uses the shared interface of :class:`cnnlab.models.base.Classifier`: ``feature_info`` names each
stage's module, channels and stride, and ``forward_intermediates`` returns every stage's map.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab._plot import save_figure
from cnnlab.viz._plot import pyplot, stretch, to_display


@dataclass
class StageMaps:
    """One stage's feature map for one image.

    Args:
        index: position in ``feature_info``; module: its dotted module name; stride: w.r.t. the input;
        maps: (C, H, W) activations.
    """

    index: int
    module: str
    stride: int
    maps: torch.Tensor

    def top_channels(self, k: int) -> tuple[list[int], list[float]]:
        """The ``k`` channels with the largest mean activation (the most active), and those means."""
        means = self.maps.float().mean((1, 2))  # (C, H, W) -> (C,)
        top = means.topk(min(k, len(means)))
        return top.indices.tolist(), top.values.tolist()


def check_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (1, C, H, W) float input -> (1, C, H, W); a channel count the model cannot take is an error."""
    if not isinstance(x, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
        raise CnnlabError(f"expected the image as a torch.Tensor of shape (C, H, W) or (1, C, H, W), "
                          f"got {type(x).__name__}{hint}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise CnnlabError(f"expected one image of shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    expected = getattr(model, "in_channels", None)
    if isinstance(expected, int) and x.shape[1] != expected:
        raise CnnlabError(f"{getattr(model, 'model_name', type(model).__name__)} expects images with {expected} "
                          f"channel{'s' * (expected != 1)}, the image has {x.shape[1]}; "
                          f"read it with channels={expected} (the CLI converts automatically)")
    return x.float() if x.dtype == torch.uint8 or not x.is_floating_point() else x


def resolve_stages(model: nn.Module, stages: Sequence[int | str] | None) -> list[int]:
    """Stage indices from indices or module names (``feature_info``); None means every stage."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise CnnlabError(f"{type(model).__name__} has no feature_info/forward_intermediates; "
                          "feature maps need a cnnlab classifier")
    if stages is None or len(stages) == 0:
        return list(range(len(info)))
    names = [i.module for i in info]
    out = []
    for s in stages:
        if isinstance(s, str) and s.lstrip("-").isdigit():
            s = int(s)
        if isinstance(s, int):
            if not -len(info) <= s < len(info):
                raise CnnlabError(f"stage {s} does not exist; this model has stages 0..{len(info) - 1} ({', '.join(names)})")
            out.append(s % len(info))
        elif s in names:
            out.append(names.index(s))
        else:
            raise CnnlabError(f"unknown stage {s!r}{did_you_mean(s, names)}; the stages are 0..{len(info) - 1} "
                              f"or their modules {', '.join(names)}")
    return out


def stage_feature_maps(model: nn.Module, image: torch.Tensor, stages: Sequence[int | str] | None = None,
                       preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[StageMaps]:
    """Feature maps of ``model`` at ``stages`` (indices or module names; default all) for one image.

    Args:
        image: (C, H, W) float input in the model's scale (uint8 is scaled to [0, 1]);
        preprocess: applied to the (1, C, H, W) batch first (a run's normalisation).
    """
    indices = resolve_stages(model, stages)
    x = check_image(model, image)
    if image.dtype == torch.uint8:
        x = x / 255
    if preprocess is not None:
        x = preprocess(x)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = model.forward_intermediates(x)
    finally:
        model.train(was_training)
    info = model.feature_info
    return [StageMaps(i, info[i].module, info[i].stride, maps[i][0].detach().cpu()) for i in indices]


def plot_feature_maps(path: str | os.PathLike, image: torch.Tensor, stages: Sequence[StageMaps], k: int = 8,
                      title: str = "") -> Path:
    """One row per stage: the input image, then its ``k`` most active channels in grey (each scaled on its own)."""
    plt = pyplot()
    cols = 1 + max(min(k, len(s.maps)) for s in stages)
    fig, axes = plt.subplots(len(stages), cols, figsize=(1.7 * cols, 1.9 * len(stages) + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, stage in zip(axes, stages):
        row[0].imshow(to_display(image), cmap="gray" if image.shape[0] == 1 else None)
        c, h, w = stage.maps.shape
        row[0].set_title(f"{stage.module}\n{c}x{h}x{w}, /{stage.stride}", fontsize=7)
        channels, means = stage.top_channels(k)
        for ax, ch, mean in zip(row[1:], channels, means):
            ax.imshow(stretch(stage.maps[ch]), cmap="gray", interpolation="nearest")
            ax.set_title(f"ch {ch}  mean {mean:.2g}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
