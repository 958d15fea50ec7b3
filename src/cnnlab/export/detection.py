"""Detectors for export: one image in, ``boxes``, ``scores``, ``labels`` out, checked detection by detection.

A cnnlab detector takes torchvision's interface, a list of (C, H, W) images in 0..1, and returns one dict per
image. For a file, :class:`OneImage` wraps it: the input is one image (``image``, (C, H, W), float in 0..1, the
detector normalises and resizes it inside), the outputs the tuple ``boxes`` (N, 4; x1, y1, x2, y2 in the
input's pixels), ``scores`` (N,), ``labels`` (N,; int64, 0 is the background), N depending on the image.

The image size is fixed at the traced one and the batch is one image: the detector's transform computes its
resize factor, and the anchors their grid, in Python from the image size, so the trace holds them as constants
(an image of another size would be resized by the traced factor); and the number of detections of each image
depends on its data, which a batch dimension cannot express.

Two things torch.export needs from the detection code are switched on by ``torch.compiler.is_exporting()``
there (see ``cnnlab.detection.boxes.batched_nms`` and ``roi_heads``); one is here: :func:`nms_may_keep_none`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab._errors import CnnlabError

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")


class OneImage(nn.Module):
    """``detector([image])[0]`` as the tuple (boxes, scores, labels): the graph a detector exports as."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        found = self.detector([image])[0]
        return tuple(found[k] for k in OUTPUT_NAMES)  # type: ignore[return-value]


def is_detector(model: nn.Module) -> bool:
    """A registered detection model, or one of cnnlab.detection's detector classes."""
    from cnnlab.compress.fold import _registry_info

    info = _registry_info(model)
    if info is not None:
        return info.task == "detection"
    from cnnlab.detection._region_models import ProposalDetector
    from cnnlab.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, (GeneralizedRCNN, ProposalDetector)) or (
        type(model).__module__.startswith("cnnlab.detection.") and hasattr(model, "transform"))


def check_exportable(model: nn.Module) -> None:
    """Refuse, with the reason, a detector whose proposals come from outside the network."""
    from cnnlab.detection._region_models import ProposalDetector

    if isinstance(model, ProposalDetector):
        name = getattr(model, "model_name", type(model).__name__)
        raise CnnlabError(f"{name} cannot be exported: its region proposals come from selective search, which runs "
                          "in OpenCV on the image's pixels (NumPy, outside the PyTorch graph), so neither torch.export "
                          "nor ONNX can hold it; export faster_rcnn (proposals from its own network) instead")


def example_image(model: nn.Module, input_size: Any) -> Tensor:
    """The one image a detector is traced on: ``input_size`` (C, H, W), a (C, H, W) or (1, C, H, W) tensor, a list
    of one image, or None (the registry's input size); random values in 0..1."""
    from cnnlab.compress.fold import probe_input

    if isinstance(input_size, (list, tuple)) and len(input_size) == 1 and isinstance(input_size[0], Tensor):
        input_size = input_size[0]
    if isinstance(input_size, Tensor):
        if input_size.ndim == 4 and input_size.shape[0] == 1:
            input_size = input_size[0]
        if input_size.ndim != 3 or not input_size.is_floating_point():
            raise CnnlabError(f"a detector exports for one image: give input_size=(C, H, W) or one float (C, H, W) "
                              f"tensor in 0..1, got a {input_size.dtype} tensor of shape {tuple(input_size.shape)}")
        return input_size
    if isinstance(input_size, (list, tuple)) and input_size and all(isinstance(t, Tensor) for t in input_size):
        raise CnnlabError(f"a detector exports for one image (batch 1), got a list of {len(input_size)} images")
    return probe_input(model, input_size, batch=1)[0]


@contextmanager
def nms_may_keep_none() -> Iterator[None]:
    """While tracing, let ``torchvision::nms`` keep any number of boxes, 0 and 1 included.

    torchvision's fake (shape-only) ``nms`` sizes its output with ``ctx.create_unbacked_symint()``, whose lower
    bound is 2; torch.export then writes a runtime assertion "kept >= 2" into the program, and the saved .pt2
    fails on an image where NMS keeps fewer boxes (often: a detector with few confident boxes). The same function
    with ``new_dynamic_size()`` (lower bound 0) is registered for the duration of the trace, in a library
    fragment that is destroyed afterwards, which puts torchvision's back.
    """
    import torchvision  # noqa: F401 - registers torchvision::nms

    lib = torch.library.Library("torchvision", "FRAGMENT")
    try:
        torch.library.register_fake("torchvision::nms", _nms_shape, lib=lib, allow_override=True)
        yield
    finally:
        lib._destroy()


def _nms_shape(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: f"boxes must be (N, 4), got {tuple(dets.shape)}")
    torch._check(scores.dim() == 1 and scores.size(0) == dets.size(0),
                 lambda: f"scores must be (N,) with N = {dets.size(0)}, got {tuple(scores.shape)}")
    return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


def compare_detections(reference: Any, outputs: list[Tensor], atol: float, where: str) -> tuple[float, float]:
    """(largest difference, box tolerance) between PyTorch's (boxes, scores, labels) and the file's.

    Detections are matched one to one, not compared in order: two detections with equal scores (frequent with
    random weights) may come out of NMS in either order in another runtime. Each PyTorch detection, in order of
    score, takes the file's detection of the same label nearest to it (largest |difference| over its 4 box
    coordinates and its score) not taken yet. Tolerances are float32's: ``atol`` for scores (probabilities) and
    ``atol * max(1, largest |coordinate|)`` for boxes (pixel coordinates of order 1000 carry errors 1000x those
    of order 1). A different number of detections, or a detection without a match within them, raises.
    """
    expected = [t.detach().cpu() for t in reference]
    if len(outputs) != len(OUTPUT_NAMES) or len(expected) != len(OUTPUT_NAMES):
        raise CnnlabError(f"{where} returns {len(outputs)} outputs; a detector's are {', '.join(OUTPUT_NAMES)}")
    boxes, scores, labels = (t.double() if t.is_floating_point() else t for t in expected)
    o_boxes, o_scores, o_labels = (torch.as_tensor(t).double() if torch.as_tensor(t).is_floating_point()
                                   else torch.as_tensor(t) for t in outputs)
    if o_boxes.shape[0] != boxes.shape[0] or o_scores.shape != scores.shape or o_labels.shape != labels.shape:
        raise CnnlabError(f"{where} finds {o_boxes.shape[0]} detections, PyTorch {boxes.shape[0]} (boxes "
                          f"{tuple(o_boxes.shape)} vs {tuple(boxes.shape)}): the file was not written")
    box_tolerance = atol * max(1.0, boxes.abs().max().item() if boxes.numel() else 1.0)
    if not boxes.numel():
        return 0.0, box_tolerance
    # (N, N): how far the file's detection j is from PyTorch's i, in units of each output's tolerance
    box_far = (boxes[:, None, :] - o_boxes[None, :, :]).abs().amax(-1)
    score_far = (scores[:, None] - o_scores[None, :]).abs()
    cost = torch.maximum(box_far / box_tolerance, score_far / atol)
    cost = torch.where(labels[:, None] == o_labels[None, :], cost, torch.full_like(cost, float("inf")))
    cost = torch.nan_to_num(cost, nan=float("inf"))
    worst = 0.0
    for i in scores.argsort(descending=True, stable=True).tolist():
        j = int(cost[i].argmin())
        if not cost[i, j] <= 1.0:
            raise CnnlabError(f"{where} differs from PyTorch: PyTorch's detection {i} (label {int(labels[i])}, score "
                              f"{scores[i].item():.4g}, box {[round(v, 2) for v in boxes[i].tolist()]}) has no match in it "
                              f"within the tolerance (boxes {box_tolerance:.3g}, scores {atol:.3g}): "
                              "the file was not written")
        worst = max(worst, box_far[i, j].item(), score_far[i, j].item())
        cost[:, j] = float("inf")  # taken
    return worst, box_tolerance
