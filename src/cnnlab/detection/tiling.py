"""Tiled (sliced) inference: a detector run on overlapping windows of an image too large for it, boxes merged.

Aerial scenes, slides and satellite images are larger than the inputs a detector is trained on, and shrinking
them to fit makes small objects vanish. DeepForest's ``predict_tile`` and SAHI cut such an image into
overlapping windows at its own resolution, detect in each, and merge. cnnlab merges without a threshold to
tune: every pixel belongs to the *core* of exactly one window (the overlap between two neighbours is split at
its middle), and a window's detection is kept only when its box centre lies in that window's core. An object
is then reported once, by the window that sees it most centrally; it is seen whole when it reaches at most
half the overlap beyond that core, so choose ``overlap`` at least as large as the largest object (in pixels:
``overlap * tile_size``). Optionally a class-wise NMS over the merged boxes removes what is left (objects
larger than that). torchvision has no tiled inference; SAHI's merge is NMS/NMM over all windows, which needs
an IoU (or IoS) threshold that also merges real neighbours in crowded scenes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.ops import batched_nms

from cnnlab._errors import CnnlabError
from cnnlab._tiles import check_tiling, tile_starts


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """Each window's core along one side: from the middle of its overlap with the previous window to the middle
    of its overlap with the next (the image's borders at the ends). The cores partition [0, length)."""
    ends = [min(s + tile, length) for s in starts]
    cuts = [0.0] + [(starts[i + 1] + ends[i]) / 2 for i in range(len(starts) - 1)] + [float(length)]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def tile_windows(height: int, width: int, tile_size: int, overlap: float = 0.25) -> list[dict[str, Any]]:
    """The windows of an ``height`` x ``width`` image: ``{"y", "x", "h", "w", "core": (y0, y1, x0, x1)}`` each.

    Neighbouring windows overlap by ``round(overlap * tile_size)`` pixels (at least; the last row and column are
    aligned to the border, so they may overlap more); a side shorter than ``tile_size`` is one window.
    """
    check_tiling(tile_size, overlap)
    stride = max(1, tile_size - round(overlap * tile_size))
    ys, xs = tile_starts(height, tile_size, stride), tile_starts(width, tile_size, stride)
    core_y, core_x = _cores(ys, tile_size, height), _cores(xs, tile_size, width)
    return [{"y": y, "x": x, "h": min(tile_size, height), "w": min(tile_size, width),
             "core": (*core_y[i], *core_x[j])} for i, y in enumerate(ys) for j, x in enumerate(xs)]


@torch.no_grad()
def predict_tiled(model: nn.Module, image: torch.Tensor, tile_size: int, overlap: float = 0.25, *,
                  batch_size: int = 4, nms_thresh: float | None = None,
                  detections_per_img: int | None = None) -> dict[str, torch.Tensor]:
    """Detections of ``model`` on ``image`` (float (C, H, W) in [0, 1], any size) from overlapping windows.

    Args:
        model: a detector with torchvision's interface, in eval mode (one dict per image).
        image: the whole image; windows are cut at its own resolution (the model's transform then resizes
            each window as it would any input).
        tile_size: the window side in pixels (the size the model was trained on, e.g. 400 for ``trees``).
        overlap: neighbouring windows share this fraction of ``tile_size``; make ``overlap * tile_size`` at least
            the largest object's side, so each object lies whole in the window whose core holds its centre.
        batch_size: windows per forward pass.
        nms_thresh: also a class-wise NMS at this IoU over the merged boxes (None: the core rule alone).
        detections_per_img: keep the top-scored this many after merging (None: all).

    Returns:
        ``{"boxes" (N, 4) XYXY in the image's pixels, "labels", "scores"}``, sorted by decreasing score.
    """
    if image.dim() != 3:
        raise CnnlabError(f"predict_tiled takes one (C, H, W) image, got shape {tuple(image.shape)}")
    if model.training:
        raise CnnlabError("predict_tiled needs the detector in eval mode (model.eval()): in training mode it "
                          "returns losses")
    if batch_size < 1:
        raise CnnlabError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image.shape[-2:]
    windows = tile_windows(int(height), int(width), tile_size, overlap)
    boxes, labels, scores = [], [], []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = [image[:, w["y"]:w["y"] + w["h"], w["x"]:w["x"] + w["w"]] for w in chunk]
        outputs = model(crops)
        if len(outputs) != len(crops):
            raise CnnlabError(f"the detector returned {len(outputs)} results for {len(crops)} windows; expected "
                              "one dict per image")
        for w, out in zip(chunk, outputs):
            b = out["boxes"].float() + out["boxes"].new_tensor([w["x"], w["y"], w["x"], w["y"]]).float()
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            y0, y1, x0, x1 = w["core"]
            # half-open cores partition the image; the far border belongs to the last window
            inside = (cx >= x0) & ((cx < x1) | (x1 == width)) & (cy >= y0) & ((cy < y1) | (y1 == height))
            boxes.append(b[inside])
            labels.append(out["labels"][inside])
            scores.append(out["scores"][inside].float())
    device = image.device
    b = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)
    c = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    s = torch.cat(scores) if scores else torch.zeros(0, device=device)
    if nms_thresh is not None:
        if not 0.0 < nms_thresh <= 1.0 or math.isnan(nms_thresh):
            raise CnnlabError(f"nms_thresh must be an IoU in (0, 1], got {nms_thresh}")
        keep = batched_nms(b, s, c, nms_thresh)  # sorted by decreasing score
    else:
        keep = torch.argsort(s, descending=True, stable=True)
    if detections_per_img is not None:
        keep = keep[:detections_per_img]
    return {"boxes": b[keep], "labels": c[keep], "scores": s[keep]}
