"""YOLOv1 (Redmon et al. 2016): detection as one regression from the image to an S x S grid of boxes.

The image is resized to a fixed square (448 px in the paper) and the network predicts, for each of the S x S
cells, B boxes ``(x, y, w, h, confidence)`` and one set of C conditional class probabilities. ``x, y`` are the
box centre's offset inside its cell (0..1), ``w, h`` the box size relative to the image; the confidence is
``Pr(object) x IoU(pred, truth)``. At test time the class-specific score of a box is confidence x class
probability (§2).

The loss is the paper's sum-squared error (§2.2, equation 3), summed over the cells and averaged over the
images of the batch:

    λcoord Σ 1obj_ij [(x - x̂)² + (y - ŷ)² + (√w - √ŵ)² + (√h - √ĥ)²]     loss_box
  + Σ 1obj_ij (C - Ĉ)²                                                   loss_obj
  + λnoobj Σ 1noobj_ij C²                                                loss_noobj
  + Σ 1obj_i Σ_c (p(c) - p̂(c))²                                          loss_cls

with λcoord = 5, λnoobj = 0.5; 1obj_ij marks the predictor j of cell i "responsible" for the cell's object (of
the cell's B predictors, the one whose box has the highest IoU with the truth), 1noobj_ij every other predictor;
Ĉ is that IoU (the paper's confidence target; ``rescore=False`` uses 1). The network predicts √w and √h, so that
an error on a small box costs more than the same error on a large one.

Differences from the paper, all on the output side: x, y, √w, √h and the confidence pass a sigmoid and the class
scores a softmax (the paper's last layer is linear), which keeps every output in its target's range when training
from scratch. When two objects' centres fall in one cell, the cell learns the larger (the paper has one object
per cell and does not say which). The trunk is any registered classifier (the paper's 24-conv Darknet is not
built); its deepest stage is pooled to S x S and a small head (a 3x3 conv, then the paper's two fully
connected layers, or a 1x1 conv per cell with ``head="conv"``) gives S x S x (B·5 + C).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.detection._yolo_common import (BackboneOptions, PostprocessConfig, TransformConfig, backbone_stages,
                                           channel_stats, check_inputs, check_positive, check_postprocess,
                                           make_transform, select_detections, split_options)
from cnnlab.detection.backbone import build_backbone
from cnnlab.layers.conv import ConvNormAct
from cnnlab.models.registry import Family, register_model

__all__ = ["YOLOv1", "YOLOv1HeadConfig", "YOLOv1LossConfig", "YOLOv1Head", "YOLOv1Loss", "GridTargets",
           "encode_grid_targets", "cell_boxes_to_xyxy", "yolov1"]


# -- one config per part ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class YOLOv1HeadConfig:
    """The grid and the head (Redmon et al. 2016, §2: S = 7, B = 2 on PASCAL VOC).

    ``head``: ``"fc"`` (the paper's two fully connected layers, ``fc_hidden`` units then S·S·(B·5 + C); the
    paper has 4096 hidden units) or ``"conv"`` (a 1x1 conv per cell, far fewer parameters).
    """

    grid_size: int = 7
    boxes_per_cell: int = 2
    head: str = "fc"
    head_channels: int = 256
    fc_hidden: int = 512
    dropout: float = 0.5


@dataclass(frozen=True)
class YOLOv1LossConfig:
    """The sum-squared loss's weights (§2.2) and the confidence target (``rescore``: the IoU, as the paper)."""

    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    rescore: bool = True


# -- targets ------------------------------------------------------------------------------------------------
@dataclass
class GridTargets:
    """The truth on the grid, for a batch of N images (or one image without the N).

    ``obj`` (N, S, S) bool: the cell holds an object's centre; ``box`` (N, S, S, 4): that object's
    ``(x, y, √w, √h)`` (x, y in the cell, 0..1; w, h relative to the image); ``cls`` (N, S, S, C): its one-hot
    class.
    Row i of the grid is the i-th band from the top (y), column j from the left (x): ``obj[n, i, j]``.
    """

    obj: Tensor
    box: Tensor
    cls: Tensor

    @staticmethod
    def stack(items: Sequence[GridTargets]) -> GridTargets:
        return GridTargets(torch.stack([t.obj for t in items]), torch.stack([t.box for t in items]),
                           torch.stack([t.cls for t in items]))


def encode_grid_targets(boxes: Tensor, labels: Tensor, image_size: tuple[int, int], grid_size: int,
                        num_classes: int) -> GridTargets:
    """One image's boxes (M, 4) x1, y1, x2, y2 in pixels and labels 1..C -> its :class:`GridTargets`.

    The cell of a box is the one its centre falls in, ``(i, j) = (floor(cy / h · S), floor(cx / w · S))``
    (a centre on the far edge belongs to the last cell); of two boxes in one cell the larger is kept.
    """
    height, width = image_size
    s = grid_size
    obj = torch.zeros(s, s, dtype=torch.bool, device=boxes.device)
    box = boxes.new_zeros(s, s, 4)
    cls = boxes.new_zeros(s, s, num_classes)
    if len(boxes) == 0:
        return GridTargets(obj, box, cls)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width * s  # centre in cell units
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height * s
    j = cx.floor().long().clamp(0, s - 1)
    i = cy.floor().long().clamp(0, s - 1)
    w = (boxes[:, 2] - boxes[:, 0]) / width
    h = (boxes[:, 3] - boxes[:, 1]) / height
    # x, y clamped to the cell: a box partly outside the image may have its centre beyond the last cell
    encoded = torch.stack(((cx - j).clamp(0, 1), (cy - i).clamp(0, 1), w.sqrt(), h.sqrt()), dim=1)
    for m in torch.argsort(w * h, stable=True).tolist():  # smallest first: the largest box of a cell writes last
        obj[i[m], j[m]] = True
        box[i[m], j[m]] = encoded[m]
        cls[i[m], j[m]] = 0.0
        cls[i[m], j[m], labels[m] - 1] = 1.0
    return GridTargets(obj, box, cls)


def cell_boxes_to_xyxy(box: Tensor) -> Tensor:
    """``(..., S, S, B, 4)`` cell boxes ``(x, y, √w, √h)`` -> x1, y1, x2, y2 relative to the image (0..1)."""
    s = box.shape[-3]
    rows = torch.arange(s, device=box.device, dtype=box.dtype).view(s, 1, 1)
    cols = torch.arange(s, device=box.device, dtype=box.dtype).view(1, s, 1)
    cx = (cols + box[..., 0]) / s
    cy = (rows + box[..., 1]) / s
    w, h = box[..., 2] ** 2, box[..., 3] ** 2
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def paired_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of boxes ``a[k]`` and ``b[k]`` (..., 4) pair by pair (torchvision.ops.box_iou gives only the full
    matrix, of which this needs the diagonal)."""
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=eps)


# -- the parts ------------------------------------------------------------------------------------------------
class YOLOv1Head(nn.Module):
    """Feature map -> S x S x (B·5 + C) raw outputs.

    Args:
        in_channels: channels of the backbone's map.
        num_outputs: B·5 + C.
        config: the grid and head options.
    """

    def __init__(self, in_channels: int, num_outputs: int, config: YOLOv1HeadConfig) -> None:
        super().__init__()
        s, c = config.grid_size, config.head_channels
        self.grid_size = s
        self.reduce = ConvNormAct(in_channels, c, 3, act_layer=partial(nn.LeakyReLU, 0.1))  # the paper's leaky ReLU
        self.pool = nn.AdaptiveAvgPool2d(s)  # any input size -> the S x S grid
        if config.head == "fc":
            self.hidden: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, config.fc_hidden),
                                                   nn.LeakyReLU(0.1), nn.Dropout(config.dropout))
            self.predict: nn.Module = nn.Linear(config.fc_hidden, s * s * num_outputs)
        elif config.head == "conv":
            self.hidden = nn.Identity()
            self.predict = nn.Conv2d(c, num_outputs, 1)
        else:
            raise CnnlabError(f"head must be 'fc' (the paper's fully connected layers) or 'conv' (1x1 conv per "
                              f"cell), got {config.head!r}")
        self.head_type = config.head

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.reduce(x))  # (N, C, S, S)
        out = self.predict(self.hidden(x))
        s = self.grid_size
        if self.head_type == "fc":
            return out.view(out.shape[0], s, s, -1)  # (N, S·S·D) -> (N, S, S, D)
        return out.permute(0, 2, 3, 1)  # (N, D, S, S) -> (N, S, S, D)


def split_outputs(raw: Tensor, boxes_per_cell: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, S, S, B·5 + C) raw -> boxes (N, S, S, B, 4) ``(x, y, √w, √h)``, confidences (N, S, S, B),
    class probabilities (N, S, S, C)."""
    b = boxes_per_cell
    per_box = raw[..., : 5 * b].unflatten(-1, (b, 5)).sigmoid()
    return per_box[..., :4], per_box[..., 4], raw[..., 5 * b:].softmax(dim=-1)


class YOLOv1Loss(nn.Module):
    """The sum-squared loss of §2.2 (see the module docstring), summed over cells, averaged over images.

    Args:
        config: λcoord, λnoobj and the confidence target.
    """

    def __init__(self, config: YOLOv1LossConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, boxes: Tensor, confidence: Tensor, class_probs: Tensor, targets: GridTargets
                ) -> dict[str, Tensor]:
        """boxes (N, S, S, B, 4), confidence (N, S, S, B), class_probs (N, S, S, C): after the activations."""
        n = boxes.shape[0]
        truth = targets.box.unsqueeze(-2)  # (N, S, S, 1, 4)
        with torch.no_grad():
            iou = paired_iou(cell_boxes_to_xyxy(boxes), cell_boxes_to_xyxy(truth).expand_as(boxes))  # (N, S, S, B)
            responsible = F.one_hot(iou.argmax(dim=-1), boxes.shape[-2]).bool() & targets.obj.unsqueeze(-1)
            target_conf = iou if self.config.rescore else torch.ones_like(iou)
        r = responsible.to(boxes.dtype)
        loss_box = (r.unsqueeze(-1) * (boxes - truth) ** 2).sum() * self.config.lambda_coord
        loss_obj = (r * (confidence - target_conf) ** 2).sum()
        loss_noobj = ((1 - r) * confidence ** 2).sum() * self.config.lambda_noobj
        loss_cls = (targets.obj.unsqueeze(-1).to(boxes.dtype) * (class_probs - targets.cls) ** 2).sum()
        return {"loss_box": loss_box / n, "loss_obj": loss_obj / n, "loss_noobj": loss_noobj / n,
                "loss_cls": loss_cls / n}


# -- the model -------------------------------------------------------------------------------------------------
class YOLOv1(nn.Module):
    """``model(images, targets)``: named losses in training, one dict of detections per image in eval.

    Args:
        backbone: images -> ``OrderedDict`` with one feature map of ``out_channels`` channels.
        num_classes: classes including the background (C + 1, as torchvision); the grid predicts the C.
        transform, head, loss, postprocess: the parts' configs.
    """

    head_name = "head.predict"  # the layer whose outputs depend on the class count

    def __init__(self, backbone: nn.Module, num_classes: int, *, transform: TransformConfig | None = None,
                 head: YOLOv1HeadConfig | None = None, loss: YOLOv1LossConfig | None = None,
                 postprocess: PostprocessConfig | None = None) -> None:
        super().__init__()
        transform, head = transform or TransformConfig(), head or YOLOv1HeadConfig()
        loss, postprocess = loss or YOLOv1LossConfig(), postprocess or PostprocessConfig()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected >= 2, "
                              f"got {num_classes!r}")
        for name in ("grid_size", "boxes_per_cell", "head_channels", "fc_hidden"):
            value = getattr(head, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CnnlabError(f"yolov1: {name} must be a positive int, got {value!r}")
        check_positive("yolov1", lambda_coord=loss.lambda_coord, lambda_noobj=loss.lambda_noobj)
        check_postprocess("yolov1", postprocess)
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int):
            raise CnnlabError("the backbone needs an out_channels attribute (the channels of its feature map)")
        strides = list(getattr(backbone, "strides", [32]))
        self.transform = make_transform(transform, max(strides))
        side = transform.size // max(strides)
        if head.head == "conv" and head.grid_size > side:
            # the pool would repeat each feature over several cells, and a 1x1 conv cannot tell them apart
            raise CnnlabError(f"head='conv' predicts each cell from its own features, but a {transform.size} px input "
                              f"gives a {side} x {side} map at stride {max(strides)}, fewer cells than "
                              f"grid_size={head.grid_size}; use grid_size <= {side}, a larger size, or head='fc'")
        self.backbone = backbone
        self.head = YOLOv1Head(channels, 5 * head.boxes_per_cell + num_classes - 1, head)
        self.loss = YOLOv1Loss(loss)
        self.num_classes = num_classes
        self.grid_size, self.boxes_per_cell = head.grid_size, head.boxes_per_cell
        self.postprocess_config = postprocess
        self.config = {"transform": transform, "head": head, "loss": loss, "postprocess": postprocess}

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_inputs(images, targets, self.training, self.num_classes)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]

        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        raw = self.head(next(iter(features.values())))  # (N, S, S, B·5 + C)
        boxes, confidence, class_probs = split_outputs(raw, self.boxes_per_cell)
        if self.training:
            assert targets is not None
            grid = GridTargets.stack([encode_grid_targets(t["boxes"], t["labels"], size, self.grid_size,
                                                          self.num_classes - 1)
                                      for t, size in zip(targets, batch.image_sizes)])
            return self.loss(boxes, confidence, class_probs, grid)
        detections = [self.detect(b, c, p, size) for b, c, p, size in
                      zip(boxes, confidence, class_probs, batch.image_sizes)]
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def detect(self, boxes: Tensor, confidence: Tensor, class_probs: Tensor, image_size: tuple[int, int]
               ) -> dict[str, Tensor]:
        """One image's grid -> detections in the resized image's pixels: score = confidence x class probability."""
        height, width = image_size
        scale = boxes.new_tensor([width, height, width, height])
        xyxy = (cell_boxes_to_xyxy(boxes) * scale).reshape(-1, 4)  # (S·S·B, 4)
        scores = (confidence.unsqueeze(-1) * class_probs.unsqueeze(-2)).reshape(len(xyxy), -1)  # (S·S·B, C)
        return select_detections(xyxy, scores, image_size, self.postprocess_config)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh prediction layer for ``num_classes`` (C + 1): fine-tuning on new classes."""
        old = self.head.predict
        outputs = 5 * self.boxes_per_cell + num_classes - 1
        s = self.grid_size
        new = nn.Linear(old.in_features, s * s * outputs) if isinstance(old, nn.Linear) else \
            nn.Conv2d(old.in_channels, outputs, 1)
        self.head.predict = new.to(old.weight.device)
        self.num_classes = num_classes


YOLO_V1 = Family("YOLO", "Redmon, Divvala, Girshick, Farhadi, You Only Look Once: Unified, Real-Time Object "
                 "Detection (CVPR 2016)", 2016, "https://arxiv.org/abs/1506.02640")


@register_model(YOLO_V1, task="detection", default_input=(3, 448, 448),
                notes="S x S grid, B boxes per cell, the paper's sum-squared loss (lambda_coord=5, lambda_noobj=0.5) "
                      "on any registered classifier (backbone='resnet18'); options size, grid_size, boxes_per_cell, "
                      "head ('fc'/'conv'), score_thresh, nms_thresh, detections_per_img.")
def yolov1(*, backbone: str = "resnet18", num_classes: int = 21, grid_size: int = 7, boxes_per_cell: int = 2,
           size: int = 448, returned_stage: int | None = None, backbone_weights: str | os.PathLike | None = None,
           trainable_backbone_layers: int | None = None, norm_layer: Any = None, in_channels: int = 3,
           **options: Any) -> YOLOv1:
    """YOLOv1 on any registered classifier (its deepest stage, or ``returned_stage``). ``options``: the fields of
    :class:`YOLOv1HeadConfig`, :class:`YOLOv1LossConfig`, ``TransformConfig`` and ``PostprocessConfig``."""
    parts = split_options("yolov1", options, {
        "transform": TransformConfig(size=size), "head": YOLOv1HeadConfig(grid_size, boxes_per_cell),
        "loss": YOLOv1LossConfig(), "postprocess": PostprocessConfig()})  # first: a typo fails before the build
    stages = backbone_stages(backbone, in_channels)
    index = len(stages) - 1 if returned_stage is None else returned_stage
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(stages):
        raise CnnlabError(f"returned_stage={returned_stage!r}: expected an index in 0..{len(stages) - 1} of "
                          f"{backbone}'s stages {[f'{f.module} (stride {f.stride})' for f in stages]}")
    opts = BackboneOptions(backbone_weights, trainable_backbone_layers, norm_layer)
    body = build_backbone(backbone, fpn=False, returned_stages=[index], weights=opts.backbone_weights,
                          trainable_layers=opts.trainable_backbone_layers, norm_layer=opts.norm_layer,
                          in_channels=in_channels)
    transform = parts["transform"]
    if body.image_mean is not None and transform.image_mean is None and transform.image_std is None:
        transform = replace(transform, image_mean=body.image_mean, image_std=body.image_std)  # the run's normalisation
    transform = channel_stats(transform, in_channels)
    model = YOLOv1(body, num_classes, transform=transform, head=parts["head"], loss=parts["loss"],
                   postprocess=parts["postprocess"])
    model.model_name = "yolov1"
    return model
