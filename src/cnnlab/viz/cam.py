"""What a trained network looks at: Grad-CAM and vanilla gradient saliency (ZFNet's motivation, made cheap).

- Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2): for a conv layer's activations A^k and the
  class score y^c (the logit, before softmax), weights alpha_k = mean over (i, j) of dy^c/dA^k_ij;
  the map is ReLU(sum_k alpha_k A^k), upsampled (bilinear) to the input size.
- Saliency (Simonyan, Vedaldi & Zisserman, ICLR 2014 workshop, sec. 3.1): max over colour channels
  of |dy^c/dx| at every pixel.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab._plot import save_figure
from cnnlab.viz._plot import pyplot, to_display
from cnnlab.viz.feature_maps import check_image

Preprocess = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Explanation:
    """A heatmap of what drove the score of one class for one image.

    Args:
        method: "gradcam" or "saliency"; target: the class index explained; probs: softmax (num_classes,);
        heatmap: (H, W) at the input size, scaled to [0, 1] (all zeros when nothing is positive);
        raw: the unscaled map (Grad-CAM: at the layer's resolution); layer: the Grad-CAM layer, else None.
    """

    method: str
    target: int
    probs: torch.Tensor
    heatmap: torch.Tensor
    raw: torch.Tensor
    layer: str | None = None

    def peak(self) -> tuple[int, int]:
        """(row, column) of the heatmap's maximum."""
        flat = int(self.heatmap.flatten().argmax())
        return divmod(flat, self.heatmap.shape[1])


def resolve_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """The module Grad-CAM reads: ``layer`` (a dotted name from ``named_modules``), default the last stage."""
    if layer is None:
        info = getattr(model, "feature_info", None)
        if not info:
            raise CnnlabError(f"{type(model).__name__} has no feature_info; name the conv layer with layer=...")
        layer = info[-1].module
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        stages = [i.module for i in getattr(model, "feature_info", [])]
        hint = f" (its stages: {', '.join(stages)})" if stages else ""
        raise CnnlabError(f"unknown layer {layer!r}{did_you_mean(layer, names)}; expected a module name of "
                          f"{getattr(model, 'model_name', type(model).__name__)} as in model.named_modules(){hint}")
    return layer, model.get_submodule(layer)


def resolve_target(target: int | str | None, classes: Sequence[str] | None, num_classes: int) -> int | None:
    """A class given by index or name -> its index; None stays None (explain the prediction)."""
    if target is None:
        return None
    if isinstance(target, str) and classes is not None and target in classes:
        return list(classes).index(target)
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        names = list(classes or [])
        raise CnnlabError(f"unknown class {target!r}{did_you_mean(target, names)}; expected a class name"
                          + (f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else "")
                          + f" or an index 0..{num_classes - 1}")
    index = int(target)
    if not 0 <= index < num_classes:
        raise CnnlabError(f"class index {index} is out of range; the model has classes 0..{num_classes - 1}")
    return index


def _prepare(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    x = check_image(model, image)
    return x / 255 if image.dtype == torch.uint8 else x


def _score(logits: torch.Tensor, target: int | None) -> tuple[torch.Tensor, int]:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise CnnlabError(f"the model must return class scores (1, num_classes), got {tuple(logits.shape)}")
    index = int(logits[0].argmax()) if target is None else target
    if not 0 <= index < logits.shape[1]:
        raise CnnlabError(f"class index {index} is out of range; the model has classes 0..{logits.shape[1] - 1}")
    return logits[0, index], index


def _scale(x: torch.Tensor) -> torch.Tensor:
    top = x.max()
    return x / top if top > 0 else torch.zeros_like(x)


def gradcam(model: nn.Module, image: torch.Tensor, target: int | None = None, layer: str | None = None,
            preprocess: Preprocess | None = None) -> Explanation:
    """Grad-CAM of class ``target`` (default: the predicted class) at ``layer`` (default: the last stage).

    Args:
        image: (C, H, W) input in the model's scale (uint8 is scaled to [0, 1]), before ``preprocess``.
        preprocess: a run's normalisation, applied inside the graph.
    """
    name, module = resolve_layer(model, layer)
    x = _prepare(model, image).detach().requires_grad_(True)  # so a layer of frozen weights still has a gradient
    captured: list[torch.Tensor] = []

    def hook(_m, _i, out):
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise CnnlabError(f"layer {name!r} outputs {type(out).__name__} "
                              f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; Grad-CAM needs a (B, C, H, W) map")
        captured.append(out)
        return out.clone()  # later in-place ops (ReLU(inplace), `out += identity`) must not overwrite what we read

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(preprocess(x) if preprocess is not None else x)
            if not captured:
                raise CnnlabError(f"layer {name!r} did not run in the eval-mode forward pass (a training-only branch?); "
                                  "pick a layer on the path to the classifier")
            if len(captured) > 1:
                raise CnnlabError(f"layer {name!r} ran {len(captured)} times in one forward pass; Grad-CAM needs a "
                                  "module that runs exactly once (a conv or a stage, not a shared activation)")
            score, index = _score(logits, target)
            activation = captured[0]
            (grad,) = torch.autograd.grad(score, activation, allow_unused=True)
            if grad is None:
                raise CnnlabError(f"the score of class {index} does not depend on layer {name!r} (a branch unused in "
                                  "eval mode?); pick a layer on the path to the classifier")
    finally:
        handle.remove()
        model.train(was_training)
    weights = grad[0].mean((1, 2))  # alpha_k: global-average-pooled gradients, (C, h, w) -> (C,)
    cam = F.relu((weights[:, None, None] * activation[0].detach()).sum(0))  # (h, w)
    up = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach()
    return Explanation("gradcam", index, logits[0].detach().softmax(0), _scale(up.clamp(min=0)), cam, name)


def saliency(model: nn.Module, image: torch.Tensor, target: int | None = None,
             preprocess: Preprocess | None = None) -> Explanation:
    """Vanilla gradient saliency: max over channels of |d score / d input| (the input before ``preprocess``)."""
    x = _prepare(model, image).detach().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(preprocess(x) if preprocess is not None else x)
            score, index = _score(logits, target)
            (grad,) = torch.autograd.grad(score, x)
    finally:
        model.train(was_training)
    raw = grad[0].abs().amax(0)  # (C, H, W) -> (H, W)
    return Explanation("saliency", index, logits[0].detach().softmax(0), _scale(raw), raw, None)


def explain(model: nn.Module, image: torch.Tensor, method: str = "gradcam", target: int | None = None,
            layer: str | None = None, preprocess: Preprocess | None = None) -> Explanation:
    """``gradcam`` or ``saliency`` by name."""
    if method == "gradcam":
        return gradcam(model, image, target, layer, preprocess)
    if method == "saliency":
        if layer is not None:
            raise CnnlabError("saliency is taken w.r.t. the input pixels; layer= applies to gradcam only")
        return saliency(model, image, target, preprocess)
    raise CnnlabError(f"unknown method {method!r}{did_you_mean(method, ['gradcam', 'saliency'])}; "
                      "expected gradcam or saliency")


def plot_explanation(path: str | os.PathLike, image: torch.Tensor, explanation: Explanation,
                     classes: Sequence[str] | None = None, title: str = "", alpha: float = 0.5) -> Path:
    """Three panels: the image the model saw, the heatmap, and the heatmap over the image."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    shown = to_display(image)
    grey = shown.ndim == 2
    heat = explanation.heatmap.numpy()
    name = classes[explanation.target] if classes is not None and explanation.target < len(classes) else str(explanation.target)
    p = float(explanation.probs[explanation.target])
    axes[0].imshow(shown, cmap="gray" if grey else None)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
    where = f" at {explanation.layer}" if explanation.layer else ""
    axes[1].set_title(f"{explanation.method}{where}", fontsize=9)
    axes[2].imshow(shown, cmap="gray" if grey else None)
    axes[2].imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    axes[2].set_title(f"class {name} (p = {p:.1%})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
