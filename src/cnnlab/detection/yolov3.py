"""YOLOv3-style detector (Redmon & Farhadi 2018): anchors on three scales, objectness and per-class sigmoids.

The backbone's stages at strides 8, 16 and 32 go through a top-down feature pyramid (torchvision's
``FeaturePyramidNetwork``: YOLOv3 concatenates the upsampled map where an FPN adds it; both carry the deep
map's semantics to the finer scales). Each scale has three anchors and a head of a 3x3 conv and a 1x1 conv
predicting, per cell and anchor, ``t_x, t_y, t_w, t_h``, an objectness logit and one logit per class (§2.1):

    b_x = (σ(t_x) + c_x) · stride,   b_w = p_w · exp(t_w)        (c_x: the cell, p_w: the anchor's width)

Anchors are (w, h) in input pixels, nine sorted by area (the three smallest to stride 8); ``anchors="kmeans"``
fits them to the training boxes (:mod:`cnnlab.detection.anchor_fit`, YOLOv2's dimension clusters) when
:meth:`YOLOv3.fit_to_data` is called (the engine does before training), ``"coco"`` takes the paper's nine
COCO anchors scaled from 416 px to ``size``, and a list of nine pairs is used as given. ``fit_to_data``
checks every anchor set against the data.

Targets (§2.1-2.3): each truth goes to the anchor whose shape (centre-aligned) overlaps it most, at that
anchor's scale, in the cell of its centre (``match_thresh`` also gives it every other anchor above that
shape IoU). A prediction not assigned to a truth but whose decoded box overlaps some truth by IoU > 0.5
(``ignore_thresh``) is left out of the no-object loss, as the paper does.

Losses, summed over predictions and divided by the number of assigned predictions in the batch (at least 1;
RetinaNet's normalisation, which keeps the terms' scale independent of the image size and the number of
anchors): ``loss_obj`` and ``loss_noobj`` the binary cross-entropy of the objectness on assigned and on
unassigned (not ignored) predictions, ``loss_cls`` the per-class binary cross-entropy on assigned ones, and
``loss_box``: with ``box_loss="mse"`` (the default, the paper's sum of squared errors on the coordinates)
``(σ(t_x) - t̂_x)² + (σ(t_y) - t̂_y)² + (t_w - t̂_w)² + (t_h - t̂_h)²``, with ``box_loss="giou"`` one minus the
generalized IoU (Rezatofighi et al. 2019; ``torchvision.ops.generalized_box_iou_loss``) of the decoded box
and the truth, which measures the overlap itself and is scale-invariant. The objectness and class biases
start at the prior log(0.01 / 0.99) (RetinaNet's π = 0.01), so the thousands of empty cells do not swamp
the first steps' loss.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from cnnlab._errors import CnnlabError
from cnnlab.detection._yolo_common import (BackboneOptions, PostprocessConfig, TransformConfig, channel_stats,
                                           check_inputs, check_positive, check_postprocess, make_transform,
                                           select_detections, split_options, stage_indices)
from cnnlab.detection.anchor_fit import check_anchors, fit_anchors, wh_iou
from cnnlab.detection.backbone import build_backbone
from cnnlab.layers.conv import ConvNormAct
from cnnlab.models.registry import Family, register_model

__all__ = ["YOLOv3", "YOLOv3HeadConfig", "YOLOv3LossConfig", "YOLOv3Head", "YOLOv3Loss", "ScaleTargets",
           "assign_targets", "decode_boxes", "COCO_ANCHORS", "yolov3"]

# the paper's nine COCO anchors (w, h) at 416 x 416 input, smallest first (Redmon & Farhadi 2018, §2.3)
COCO_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
ANCHORS_SETTING = "model.options.anchors"  # how a user sets them, for messages
MAX_LOG_SCALE = math.log(1000.0 / 16)  # decoding bound on t_w, t_h (torchvision's BoxCoder clip)
PRIOR = 0.01


# -- one config per part ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class YOLOv3HeadConfig:
    """The neck's channels and the prediction heads (three anchors per scale at strides 8, 16, 32)."""

    neck_channels: int = 128
    anchors_per_scale: int = 3
    strides: tuple[int, ...] = (8, 16, 32)


@dataclass(frozen=True)
class YOLOv3LossConfig:
    """Target assignment and the loss terms (see the module docstring).

    ``match_thresh``: None (only the best anchor per truth, the paper) or a shape IoU above which other anchors
    are assigned too; ``ignore_thresh``: the paper's 0.5; ``box_loss``: ``"mse"`` or ``"giou"``.
    """

    ignore_thresh: float = 0.5
    match_thresh: float | None = None
    box_loss: str = "mse"
    lambda_box: float = 1.0
    lambda_obj: float = 1.0
    lambda_noobj: float = 1.0
    lambda_cls: float = 1.0


# -- targets ------------------------------------------------------------------------------------------------
@dataclass
class ScaleTargets:
    """The truth at one scale for one image: ``assigned`` (H, W, A) bool; where assigned, ``txy`` (H, W, A, 2)
    the centre's offset in its cell, ``twh`` (H, W, A, 2) log(size / anchor), ``label`` (H, W, A) 1..C,
    ``box`` (H, W, A, 4) the truth x1, y1, x2, y2 in pixels."""

    assigned: Tensor
    txy: Tensor
    twh: Tensor
    label: Tensor
    box: Tensor


def assign_targets(boxes: Tensor, labels: Tensor, anchors: Tensor, strides: Sequence[int],
                   grid_sizes: Sequence[tuple[int, int]], match_thresh: float | None = None) -> list[ScaleTargets]:
    """One image's truths (M, 4) x1, y1, x2, y2 in input pixels -> their targets at each scale.

    Args:
        anchors: (L·A, 2) anchors (w, h), A per scale, scale l's at rows l·A .. l·A + A - 1.
        strides, grid_sizes: each scale's stride and (H, W).
        match_thresh: also assign every anchor whose shape IoU with the truth exceeds this.
    """
    num_scales = len(strides)
    per_scale = len(anchors) // num_scales
    out = []
    for (h, w) in grid_sizes:
        out.append(ScaleTargets(torch.zeros(h, w, per_scale, dtype=torch.bool, device=boxes.device),
                                boxes.new_zeros(h, w, per_scale, 2), boxes.new_zeros(h, w, per_scale, 2),
                                torch.zeros(h, w, per_scale, dtype=torch.int64, device=boxes.device),
                                boxes.new_zeros(h, w, per_scale, 4)))
    if len(boxes) == 0:
        return out
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    shape_iou = wh_iou(wh, anchors.to(wh))  # (M, L·A)
    chosen = F.one_hot(shape_iou.argmax(dim=1), len(anchors)).bool()
    if match_thresh is not None:
        chosen |= shape_iou > match_thresh
    # smallest truth last: where two share a cell and anchor, the smaller one is kept (it has fewer cells)
    order = torch.argsort(wh[:, 0] * wh[:, 1], descending=True, stable=True)
    for m, a in chosen[order].nonzero().tolist():
        m = int(order[m])
        level, k = divmod(a, per_scale)
        t, stride = out[level], strides[level]
        h, w = grid_sizes[level]
        cell = centre[m] / stride
        # a centre on the far edge (or, for a box partly outside the image, beyond it) goes to the nearest cell
        j, i = min(max(int(cell[0].floor()), 0), w - 1), min(max(int(cell[1].floor()), 0), h - 1)
        t.assigned[i, j, k] = True
        t.txy[i, j, k] = (cell - cell.new_tensor([j, i])).clamp(0.0, 1.0)
        t.twh[i, j, k] = torch.log(wh[m] / anchors[a].to(wh))
        t.label[i, j, k] = labels[m]
        t.box[i, j, k] = boxes[m]
    return out


def decode_boxes(raw: Tensor, anchors: Tensor, stride: int) -> Tensor:
    """(..., H, W, A, >= 4) raw ``t_x, t_y, t_w, t_h`` and the scale's (A, 2) anchors -> x1, y1, x2, y2 pixels."""
    h, w = raw.shape[-4], raw.shape[-3]
    rows = torch.arange(h, device=raw.device, dtype=raw.dtype).view(h, 1, 1)
    cols = torch.arange(w, device=raw.device, dtype=raw.dtype).view(1, w, 1)
    cx = (raw[..., 0].sigmoid() + cols) * stride
    cy = (raw[..., 1].sigmoid() + rows) * stride
    bw = anchors[:, 0] * raw[..., 2].clamp(max=MAX_LOG_SCALE).exp()
    bh = anchors[:, 1] * raw[..., 3].clamp(max=MAX_LOG_SCALE).exp()
    return torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), dim=-1)


# -- the parts ------------------------------------------------------------------------------------------------
class YOLOv3Head(nn.Module):
    """One prediction head per scale: a 3x3 conv (leaky ReLU 0.1), then a 1x1 conv to A·(5 + C) channels.

    Args:
        channels: the neck's channels.
        num_scales, anchors_per_scale: L and A.
        num_classes: C, the foreground classes.
    """

    def __init__(self, channels: int, num_scales: int, anchors_per_scale: int, num_classes: int) -> None:
        super().__init__()
        self.anchors_per_scale = anchors_per_scale
        self.convs = nn.ModuleList(ConvNormAct(channels, 2 * channels, 3, act_layer=partial(nn.LeakyReLU, 0.1))
                                   for _ in range(num_scales))
        self.predict = nn.ModuleList(self._predictor(2 * channels, num_classes) for _ in range(num_scales))

    def _predictor(self, channels: int, num_classes: int) -> nn.Conv2d:
        conv = nn.Conv2d(channels, self.anchors_per_scale * (5 + num_classes), 1)
        nn.init.normal_(conv.weight, std=0.01)
        with torch.no_grad():  # objectness and class biases at the prior (RetinaNet's π)
            bias = conv.bias.view(self.anchors_per_scale, 5 + num_classes)
            bias.zero_()
            bias[:, 4:] = math.log(PRIOR / (1 - PRIOR))
        return conv

    def reset_classes(self, num_classes: int) -> None:
        for i, old in enumerate(self.predict):
            self.predict[i] = self._predictor(old.in_channels, num_classes).to(old.weight.device)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for x, conv, predict in zip(features, self.convs, self.predict):
            y = predict(conv(x))  # (N, A·(5 + C), H, W)
            n, _, h, w = y.shape
            out.append(y.view(n, self.anchors_per_scale, -1, h, w).permute(0, 3, 4, 1, 2))  # (N, H, W, A, 5 + C)
        return out


class YOLOv3Loss(nn.Module):
    """Objectness, class and box losses over the scales (see the module docstring).

    Args:
        config: the assignment thresholds, the box loss and the terms' weights.
    """

    def __init__(self, config: YOLOv3LossConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, outputs: Sequence[Tensor], anchors: Sequence[Tensor], strides: Sequence[int],
                targets: Sequence[Sequence[ScaleTargets]], truths: Sequence[Tensor]) -> dict[str, Tensor]:
        """outputs: per scale (N, H, W, A, 5 + C) raw; anchors: per scale (A, 2); targets: per image, per scale;
        truths: per image (M, 4) boxes in input pixels (for the ignore rule)."""
        cfg = self.config
        zero = outputs[0].sum() * 0.0  # keeps the graph (and the device) when a term has no prediction
        box, obj, noobj, cls = zero, zero, zero, zero
        positives = 0
        for level, (raw, scale_anchors, stride) in enumerate(zip(outputs, anchors, strides)):
            assigned = torch.stack([t[level].assigned for t in targets])  # (N, H, W, A)
            with torch.no_grad():
                decoded = decode_boxes(raw.detach(), scale_anchors, stride)
                ignore = torch.zeros_like(assigned)
                for n, truth in enumerate(truths):
                    if len(truth):
                        best = box_iou(decoded[n].reshape(-1, 4), truth).max(dim=1).values
                        ignore[n] = best.view(assigned.shape[1:]) > cfg.ignore_thresh
            logit = raw[..., 4]
            obj = obj + F.binary_cross_entropy_with_logits(logit[assigned], torch.ones_like(logit[assigned]),
                                                           reduction="sum")
            negative = ~assigned & ~ignore
            noobj = noobj + F.binary_cross_entropy_with_logits(logit[negative], torch.zeros_like(logit[negative]),
                                                               reduction="sum")
            positives += int(assigned.sum())
            if not assigned.any():
                continue
            pos = raw[assigned]  # (P, 5 + C)
            label = torch.stack([t[level].label for t in targets])[assigned]
            one_hot = F.one_hot(label - 1, pos.shape[1] - 5).to(pos.dtype)
            cls = cls + F.binary_cross_entropy_with_logits(pos[:, 5:], one_hot, reduction="sum")
            if cfg.box_loss == "mse":
                txy = torch.stack([t[level].txy for t in targets])[assigned]
                twh = torch.stack([t[level].twh for t in targets])[assigned]
                box = box + ((pos[:, :2].sigmoid() - txy) ** 2).sum() + ((pos[:, 2:4] - twh) ** 2).sum()
            else:
                truth_box = torch.stack([t[level].box for t in targets])[assigned]
                pred_box = decode_boxes(raw, scale_anchors, stride)[assigned]
                box = box + generalized_box_iou_loss(pred_box, truth_box, reduction="sum")
        norm = max(positives, 1)
        return {"loss_box": cfg.lambda_box * box / norm, "loss_obj": cfg.lambda_obj * obj / norm,
                "loss_noobj": cfg.lambda_noobj * noobj / norm, "loss_cls": cfg.lambda_cls * cls / norm}


# -- the model -------------------------------------------------------------------------------------------------
class YOLOv3(nn.Module):
    """``model(images, targets)``: named losses in training, one dict of detections per image in eval.

    Args:
        backbone: images -> ``OrderedDict`` of feature maps (its first L are used, at ``head.strides``), each of
            ``out_channels`` channels.
        num_classes: classes including the background (C + 1, as torchvision); the heads predict the C.
        anchors: (L·A, 2) anchors (w, h) in input pixels, sorted by area; with ``fit=True`` they are a placeholder
            until :meth:`fit_to_data` replaces them by k-means.
        fit: the anchors come from k-means on the training boxes (``anchors="kmeans"``).
        transform, head, loss, postprocess: the parts' configs.
    """

    head_name = "head.predict"  # the layers whose outputs depend on the class count

    def __init__(self, backbone: nn.Module, num_classes: int, anchors: Tensor, *, fit: bool = False,
                 transform: TransformConfig | None = None, head: YOLOv3HeadConfig | None = None,
                 loss: YOLOv3LossConfig | None = None, postprocess: PostprocessConfig | None = None) -> None:
        super().__init__()
        transform, head = transform or TransformConfig(size=416), head or YOLOv3HeadConfig()
        loss, postprocess = loss or YOLOv3LossConfig(), postprocess or PostprocessConfig()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected >= 2, "
                              f"got {num_classes!r}")
        if loss.box_loss not in ("mse", "giou"):
            raise CnnlabError(f"box_loss must be 'mse' (squared error on t, the paper's) or 'giou', "
                              f"got {loss.box_loss!r}")
        for name in ("ignore_thresh",) + (("match_thresh",) if loss.match_thresh is not None else ()):
            value = getattr(loss, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise CnnlabError(f"yolov3: {name} must be an IoU in [0, 1], got {value!r}")
        check_positive("yolov3", neck_channels=head.neck_channels, anchors_per_scale=head.anchors_per_scale)
        check_postprocess("yolov3", postprocess)
        num_scales = len(head.strides)
        if tuple(anchors.shape) != (num_scales * head.anchors_per_scale, 2):
            raise CnnlabError(f"{ANCHORS_SETTING}: {len(anchors)} anchors do not fit the head, which has "
                              f"{num_scales} scales x {head.anchors_per_scale} anchors = "
                              f"{num_scales * head.anchors_per_scale} (w, h) pairs")
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int):
            raise CnnlabError("the backbone needs an out_channels attribute (the channels of its feature maps)")
        self.transform = make_transform(transform, max(head.strides))
        self.backbone = backbone
        self.head = YOLOv3Head(channels, num_scales, head.anchors_per_scale, num_classes - 1)
        self.loss = YOLOv3Loss(loss)
        self.register_buffer("anchors", anchors.float().clone())  # saved with the weights: a fitted set travels
        # whether the anchors are usable (False: 'kmeans' before fit_to_data); a buffer, so a checkpoint restores it
        self.register_buffer("anchors_ready", torch.tensor(not fit))
        self.fit = fit
        self.num_classes = num_classes
        self.strides = tuple(head.strides)
        self.anchors_per_scale = head.anchors_per_scale
        self.input_size = transform.size
        self.postprocess_config = postprocess
        self.config = {"transform": transform, "head": head, "loss": loss, "postprocess": postprocess}

    # -- anchors ------------------------------------------------------------------------------------------------
    def input_box_wh(self, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(M, 4) x1, y1, x2, y2 boxes of an image of ``image_size`` (h, w) -> (M, 2) their (w, h) in the
        model's input pixels (every image is resized to ``size`` x ``size``)."""
        height, width = image_size
        wh = boxes[:, 2:] - boxes[:, :2]
        return wh.float() * wh.new_tensor([self.input_size / width, self.input_size / height], dtype=torch.float32)

    def fit_to_data(self, box_wh: Tensor, *, seed: int = 0) -> dict[str, Any]:
        """Fit the anchors to the training boxes (``anchors="kmeans"``) and check them (always).

        Args:
            box_wh: (N, 2) widths and heights of the training boxes in the model's input pixels
                (:meth:`input_box_wh` converts an image's boxes); rows of zero width or height are left out.
            seed: k-means' seed.
        Returns:
            the anchors and their statistics on the data (``mean_best_iou``, ``recall`` at IoU 0.25, ...).
        Raises:
            CnnlabError: when the anchors match no (or too few) training boxes, naming ``model.options.anchors``
            and showing the boxes' sizes.
        """
        box_wh = torch.as_tensor(box_wh, dtype=torch.float32).reshape(-1, 2).cpu()
        box_wh = box_wh[(box_wh > 0).all(dim=1)]  # boxes of no width or height are not trained on either
        if self.fit:
            try:
                fitted = fit_anchors(box_wh, k=len(self.anchors), seed=seed)
            except CnnlabError as e:  # no boxes, or fewer shapes than anchors: say which setting to change
                raise CnnlabError(f"{ANCHORS_SETTING}='kmeans': {e}") from None
            with torch.no_grad():
                self.anchors.copy_(fitted.to(self.anchors.device))
                self.anchors_ready.fill_(True)
        stats = check_anchors(self.anchors.cpu(), box_wh, setting=ANCHORS_SETTING)
        return {"anchors": self.anchors.cpu().tolist(), **stats}

    def scale_anchors(self) -> list[Tensor]:
        """The anchors of each scale, (A, 2) each."""
        return list(self.anchors.split(self.anchors_per_scale))

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_inputs(images, targets, self.training, self.num_classes)
        if self.training and not bool(self.anchors_ready):
            raise CnnlabError(f"{ANCHORS_SETTING}='kmeans': the anchors are not fitted yet; call "
                              "model.fit_to_data(box_wh) with the training boxes' sizes in input pixels first "
                              "(cnnlab train does), or give anchors='coco' or nine (w, h) pairs")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]

        batch, targets = self.transform(images, targets if self.training else None)
        features = list(self.backbone(batch.tensors).values())[: len(self.strides)]  # the FPN's extra level unused
        outputs = self.head(features)
        anchors = self.scale_anchors()
        if self.training:
            assert targets is not None
            grids = [tuple(o.shape[1:3]) for o in outputs]
            assigned = [assign_targets(t["boxes"], t["labels"], self.anchors, self.strides, grids,
                                       self.loss.config.match_thresh) for t in targets]
            return self.loss(outputs, anchors, self.strides, assigned, [t["boxes"] for t in targets])
        detections = []
        for n, size in enumerate(batch.image_sizes):
            boxes = torch.cat([decode_boxes(o[n], a, s).reshape(-1, 4) for o, a, s in
                               zip(outputs, anchors, self.strides)])
            raw = torch.cat([o[n].reshape(-1, o.shape[-1]) for o in outputs])  # (Σ H·W·A, 5 + C)
            scores = raw[:, 4:5].sigmoid() * raw[:, 5:].sigmoid()  # objectness x class, per class
            detections.append(select_detections(boxes, scores, size, self.postprocess_config))
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh prediction layers for ``num_classes`` (C + 1): fine-tuning on new classes."""
        self.head.reset_classes(num_classes - 1)
        self.num_classes = num_classes


def parse_anchors(anchors: Any, size: int, num_scales: int, per_scale: int) -> tuple[Tensor, bool]:
    """``anchors`` option -> ((num_scales * per_scale, 2) anchors sorted by area, whether k-means fits them)."""
    count = num_scales * per_scale
    coco = torch.tensor(COCO_ANCHORS, dtype=torch.float32) * (size / 416)
    if isinstance(anchors, str):
        if anchors == "kmeans":  # a placeholder until fit_to_data: the paper's, at this input size, as many as needed
            return coco[torch.linspace(0, len(coco) - 1, count).round().long()], True
        if anchors == "coco":
            if count != len(coco):
                raise CnnlabError(f"{ANCHORS_SETTING}='coco' is the paper's {len(coco)} anchors, but the head takes "
                                  f"{num_scales} scales x {per_scale} = {count}; use 'kmeans' or {count} (w, h) pairs")
            return coco, False
        raise CnnlabError(f"{ANCHORS_SETTING}={anchors!r}: expected 'kmeans' (fitted to the training boxes), 'coco' "
                          f"(the paper's nine, scaled to size={size}) or a list of {count} (w, h) pairs in input "
                          "pixels")
    try:
        given = torch.tensor([[float(v) for v in pair] for pair in anchors], dtype=torch.float32)
    except (TypeError, ValueError):
        raise CnnlabError(f"{ANCHORS_SETTING}={anchors!r}: expected a list of {count} (w, h) pairs in input pixels, "
                          "'kmeans' or 'coco'") from None
    if given.ndim != 2 or given.shape[1] != 2 or len(given) != count:
        raise CnnlabError(f"{ANCHORS_SETTING}: got {len(given)} anchors of shape {tuple(given.shape[1:])} but the "
                          f"head takes {count} (w, h) pairs ({num_scales} scales x {per_scale} anchors, smallest "
                          "first)")
    if not torch.isfinite(given).all() or (given <= 0).any():
        raise CnnlabError(f"{ANCHORS_SETTING}: anchors must be positive (w, h) in input pixels, got {anchors!r}")
    return given[torch.argsort(given[:, 0] * given[:, 1], stable=True)], False


YOLO_V3 = Family("YOLOv3", "Redmon and Farhadi, YOLOv3: An Incremental Improvement (arXiv 2018)", 2018,
                 "https://arxiv.org/abs/1804.02767")


@register_model(YOLO_V3, task="detection", default_input=(3, 416, 416),
                notes="Three scales (strides 8/16/32, FPN neck) x three anchors, objectness and per-class sigmoids, "
                      "any registered classifier (backbone='resnet18'); anchors='kmeans' (fitted to the training "
                      "boxes), 'coco' or nine (w, h) pairs; box_loss 'mse' or 'giou'.")
def yolov3(*, backbone: str = "resnet18", num_classes: int = 81, anchors: Any = "kmeans", size: int = 416,
           backbone_weights: str | os.PathLike | None = None, trainable_backbone_layers: int | None = None,
           norm_layer: Any = None, in_channels: int = 3, **options: Any) -> YOLOv3:
    """YOLOv3-style detector on any registered classifier. ``options``: the fields of :class:`YOLOv3HeadConfig`
    (but ``strides``), :class:`YOLOv3LossConfig`, ``TransformConfig`` and ``PostprocessConfig``."""
    parts = split_options("yolov3", options, {
        "transform": TransformConfig(size=size), "head": YOLOv3HeadConfig(), "loss": YOLOv3LossConfig(),
        "postprocess": PostprocessConfig(nms_thresh=0.45)})  # darknet's NMS threshold
    head = parts["head"]
    if head.strides != YOLOv3HeadConfig.strides:
        raise CnnlabError(f"yolov3 predicts at strides {YOLOv3HeadConfig.strides}; strides={head.strides!r} is not "
                          "an option to change")
    if isinstance(head.anchors_per_scale, bool) or not isinstance(head.anchors_per_scale, int) \
            or head.anchors_per_scale < 1:
        raise CnnlabError(f"yolov3: anchors_per_scale must be a positive int, got {head.anchors_per_scale!r}")
    anchor_wh, fit = parse_anchors(anchors, parts["transform"].size, len(head.strides), head.anchors_per_scale)
    opts = BackboneOptions(backbone_weights, trainable_backbone_layers, norm_layer)
    body = build_backbone(backbone, fpn=True, returned_stages=stage_indices(backbone, head.strides, in_channels),
                          weights=opts.backbone_weights, trainable_layers=opts.trainable_backbone_layers,
                          norm_layer=opts.norm_layer, fpn_channels=head.neck_channels, in_channels=in_channels)
    transform = parts["transform"]
    if body.image_mean is not None and transform.image_mean is None and transform.image_std is None:
        transform = replace(transform, image_mean=body.image_mean, image_std=body.image_std)  # the run's normalisation
    transform = channel_stats(transform, in_channels)
    model = YOLOv3(body, num_classes, anchor_wh, fit=fit, transform=transform, head=head, loss=parts["loss"],
                   postprocess=parts["postprocess"])
    model.model_name = "yolov3"
    return model
