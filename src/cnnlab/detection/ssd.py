"""SSD (Liu et al. 2016): one network predicts classes and box offsets for default boxes on several feature maps.

:class:`SSD` composes named parts: ``transform`` (normalise, resize to one fixed ``size``) -> ``backbone`` (the
feature maps) -> ``head`` (per map, 3 x 3 convs for class scores and offsets) and ``default_boxes``; in training
``loss`` (matching at IoU 0.5, hard negatives 3:1, smooth L1 + softmax cross-entropy), in eval ``postprocess``
(per-class top-k, NMS) and the boxes back to each input's size. Options are torchvision's names, grouped into
:class:`SSDTransformConfig`, :class:`DefaultBoxConfig`, :class:`MultiBoxConfig`, :class:`SSDPostprocessConfig`:

- ``ssd300_vgg16``: torchvision's model and layout (VGG-16 base, conv8_2 .. conv11_2, SSD300's default boxes);
  ``cnnlab.load_weights`` reads torchvision's state_dict.
- ``ssd``: any registered classifier as base (``backbone="resnet18"``), its stages of stride >= 8 tapped
  through ``feature_info`` and extra stride-2 blocks after them, default-box scales and ratios as options.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.detection._ssd_backbones import (SSD300_EXTRAS, ExtraBlock, PyramidBackbone, SSDHead, SSDVGG16,
                                             TappedBackbone)
from cnnlab.detection._ssd_boxes import (DefaultBoxGenerator, MultiBoxLoss, SSDPostprocess, paper_aspect_ratios,
                                         paper_scales)
from cnnlab.detection.anchor_fit import AnchorCheck
from cnnlab.detection.backbone import build_backbone
from cnnlab.detection.boxes import BoxCoder
from cnnlab.detection.options import check_inputs, group_options
from cnnlab.detection.transform import DetectionTransform
from cnnlab.models.registry import Family, StateDict, register_model
from cnnlab.models.vgg import VGG16

__all__ = ["SSD", "SSDTransformConfig", "DefaultBoxConfig", "MultiBoxConfig", "SSDPostprocessConfig",
           "split_options", "ssd300_vgg16", "ssd", "from_torchvision"]


# -- one config per part ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SSDTransformConfig:
    """Every image is resized to ``size`` (width, height; an int: square) and normalised (ImageNet's by default)."""

    size: int | tuple[int, int] = 300
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    def fixed_size(self) -> tuple[int, int]:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in size):
            raise CnnlabError(f"size={self.size!r}: expected a positive int or (width, height) of positive ints")
        return size  # type: ignore[return-value]


@dataclass(frozen=True)
class DefaultBoxConfig:
    """The default boxes (§2.2). ``aspect_ratios``: per map, the ratios r beside 1 (each also gives 1/r); None:
    SSD300's ({2} on the first and last two maps, {2, 3} between). ``scales``: m + 1 values, the share of the
    image side of each map's boxes plus the last map's extra box (may exceed 1); None: evenly spaced from
    ``min_scale`` to ``max_scale`` (the paper's 0.2 .. 0.9), then 1.0. ``steps``: per map the pixels between box
    centres; None: the image side over the map's cells. ``clip``: widths and heights clipped to the image."""

    aspect_ratios: tuple[tuple[float, ...], ...] | None = None
    scales: tuple[float, ...] | None = None
    min_scale: float = 0.2
    max_scale: float = 0.9
    steps: tuple[int, ...] | None = None
    clip: bool = True

    def generator(self, num_maps: int) -> DefaultBoxGenerator:
        """The default-box generator for ``num_maps`` feature maps, or a CnnlabError naming the bad setting."""
        ratios = self.aspect_ratios if self.aspect_ratios is not None else paper_aspect_ratios(num_maps)
        ratios = tuple((r,) if isinstance(r, (int, float)) else tuple(r) for r in ratios)
        if len(ratios) != num_maps:
            raise CnnlabError(f"aspect_ratios={_plain(ratios)} has {len(ratios)} entries but the backbone gives "
                              f"{num_maps} feature maps; give one tuple of ratios per map, e.g. "
                              f"{_plain(paper_aspect_ratios(num_maps))}")
        if any(not isinstance(r, (int, float)) or r <= 0 for level in ratios for r in level):
            raise CnnlabError(f"aspect_ratios={_plain(ratios)}: every ratio must be a positive number")
        if self.scales is not None:
            scales = tuple(self.scales)
            if len(scales) != num_maps + 1:
                raise CnnlabError(f"scales={list(scales)} has {len(scales)} values; {num_maps} feature maps need "
                                  f"{num_maps + 1} (one per map, then the last map's extra box)")
            if any(not 0 < s <= 1 for s in scales[:-1]) or not scales[-1] > 0:
                raise CnnlabError(f"scales={list(scales)}: the scales of the maps are shares of the image side, in "
                                  "(0, 1]; the last (the extra box of the last map) must be positive")
        else:
            for name, value in (("min_scale", self.min_scale), ("max_scale", self.max_scale)):
                if not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise CnnlabError(f"{name}={value!r}: default-box scales are shares of the image side, in (0, 1]")
            if self.min_scale > self.max_scale:
                raise CnnlabError(f"min_scale={self.min_scale} is larger than max_scale={self.max_scale}")
            scales = paper_scales(num_maps, self.min_scale, self.max_scale)
        if self.steps is not None and (len(self.steps) != num_maps or any(s <= 0 for s in self.steps)):
            raise CnnlabError(f"steps={list(self.steps)}: expected {num_maps} positive values (one per feature map) "
                              "or None")
        return DefaultBoxGenerator(ratios, scales, self.steps, self.clip)


@dataclass(frozen=True)
class MultiBoxConfig:
    """Training: ``iou_thresh`` for a positive match (0.5), ``positive_fraction`` of positives among the boxes
    classified (0.25: 3 hard negatives per positive)."""

    iou_thresh: float = 0.5
    positive_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.iou_thresh <= 1:
            raise CnnlabError(f"iou_thresh={self.iou_thresh!r}: expected an IoU in (0, 1]")
        if not 0 < self.positive_fraction <= 1:
            raise CnnlabError(f"positive_fraction={self.positive_fraction!r}: expected a share in (0, 1] "
                              "(0.25 keeps 3 negatives per positive)")


@dataclass(frozen=True)
class SSDPostprocessConfig:
    """Inference (torchvision's defaults): class scores above ``score_thresh``, the ``topk_candidates`` best per
    class, NMS per class at ``nms_thresh``, the ``detections_per_img`` best kept."""

    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 200
    topk_candidates: int = 400

    def __post_init__(self) -> None:
        if not 0 <= self.score_thresh < 1:
            raise CnnlabError(f"score_thresh={self.score_thresh!r}: expected a class probability in [0, 1)")
        if not 0 < self.nms_thresh <= 1:
            raise CnnlabError(f"nms_thresh={self.nms_thresh!r}: expected an IoU in (0, 1]")
        for name in ("detections_per_img", "topk_candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CnnlabError(f"{name}={value!r}: expected a positive int")


PARTS = {"transform": SSDTransformConfig, "boxes": DefaultBoxConfig, "loss": MultiBoxConfig,
         "postprocess": SSDPostprocessConfig}
# torchvision's flat option names (and the default-box ones) -> their part
OPTIONS: dict[str, str] = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}


def split_options(options: dict[str, Any], **given: Any) -> dict[str, Any]:
    """Flat options -> one config per part (``transform``, ``boxes``, ``loss``, ``postprocess``), over ``given``."""
    return group_options("SSD", options, {part: given.get(part) or cls() for part, cls in PARTS.items()})


def _plain(value: Any) -> Any:
    return [list(v) for v in value]


# -- the model --------------------------------------------------------------------------------------------------
class SSD(AnchorCheck, nn.Module):
    """``model(images, targets)``: ``{"bbox_regression", "classification"}`` in training, detections in eval.

    Args:
        backbone: images (B, C, H, W) -> ``OrderedDict`` of feature maps; its ``out_channels`` lists their channels.
        num_classes: classes including the background (K + 1).
        transform, boxes, loss, postprocess: the parts' configs (defaults: torchvision's; boxes: the paper's).
        head_blocks: residual prediction blocks per map before the predictors (DSSD's prediction module; see
            :class:`PredictionBlock`), first map first; none by default, as the paper.
    """

    head_name = "head.cls_logits"  # the class-specific part (weights for another class count skip it)

    anchor_setting = "model.options.scales / aspect_ratios (min_scale, max_scale)"

    def anchor_shapes(self) -> Tensor:
        """(K, 2) default-box widths and heights in input pixels (shares of the side times the fixed size)."""
        width, height = self.transform.fixed_size
        pairs = torch.cat(self.default_boxes.wh_pairs)
        return torch.unique(pairs * pairs.new_tensor([width, height]), dim=0)

    def __init__(self, backbone: nn.Module, num_classes: int, *, transform: SSDTransformConfig | None = None,
                 boxes: DefaultBoxConfig | None = None, loss: MultiBoxConfig | None = None,
                 postprocess: SSDPostprocessConfig | None = None, head_blocks: Sequence[int] = ()) -> None:
        super().__init__()
        transform, boxes = transform or SSDTransformConfig(), boxes or DefaultBoxConfig()
        loss, postprocess = loss or MultiBoxConfig(), postprocess or SSDPostprocessConfig()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected >= 2, "
                              f"got {num_classes!r}")
        channels = list(getattr(backbone, "out_channels", None) or [])
        if not channels:
            raise CnnlabError("the backbone needs an out_channels attribute: the channels of each feature map")
        width, height = transform.fixed_size()
        self.transform = DetectionTransform(min(width, height), max(width, height), transform.image_mean,
                                            transform.image_std, size_divisible=1, fixed_size=(width, height))
        self.backbone = backbone
        self.default_boxes = boxes.generator(len(channels))
        if len(head_blocks) > len(channels) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                                                   for n in head_blocks):
            raise CnnlabError(f"head_blocks={list(head_blocks)!r}: expected at most {len(channels)} non-negative ints "
                              "(prediction blocks per feature map, first map first)")
        self.head = SSDHead(channels, self.default_boxes.num_anchors_per_location(), num_classes, head_blocks)
        coder = BoxCoder((10.0, 10.0, 5.0, 5.0))  # torchvision's SSD weights (the paper's variances 0.1, 0.2)
        self.loss = MultiBoxLoss(coder, loss.iou_thresh, loss.positive_fraction)
        self.postprocess = SSDPostprocess(coder, postprocess.score_thresh, postprocess.nms_thresh,
                                          postprocess.detections_per_img, postprocess.topk_candidates)
        self.num_classes = num_classes
        self.config = {"transform": transform, "boxes": boxes, "loss": loss, "postprocess": postprocess}

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        original_sizes = check_inputs(images, targets, self.training, self.num_classes)

        batch, targets = self.transform(images, targets if self.training else None)
        features = list(self.backbone(batch.tensors).values())
        cls_logits, bbox_regression = self.head(features)
        default_boxes = self.default_boxes(batch, features)
        if self.training:
            return self.loss(targets, cls_logits, bbox_regression, default_boxes)
        detections = self.postprocess(cls_logits, bbox_regression, default_boxes, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def distill_from(self, temperature: float, weight: float) -> None:
        """Training targets that carry ``teacher_logits`` (N, K) per box (a classifier's view of each box's crop,
        :meth:`cnnlab.compress.distill.Teacher.box_logits`) add a ``distillation`` loss: ``weight * T^2 *
        KL(teacher_T || student_T)`` over the foreground classes of the default boxes matched to each box, per
        positive, beside the detector's own losses (which keep the labels: the background and the boxes are only
        in them). Inference does not change. The detection task calls it for ``distill.teacher``."""
        self.loss.distillation = (float(temperature), float(weight))

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh class-score convs for ``num_classes`` (K + 1): fine-tuning on new classes."""
        self.head.reset_classifier(num_classes)
        self.num_classes = num_classes


# -- torchvision's checkpoint ------------------------------------------------------------------------------------
def _vgg_positions(stages: Sequence = VGG16) -> tuple[dict[int, str], dict[int, str], int]:
    """Where torchvision keeps VGG's convs in SSD, which cuts VGG before pool4.

    Returns ``features.N`` -> ``stages.i.j`` for conv1_1 .. conv4_3 (a conv and a ReLU each, a pool after each
    stage), ``extra.0.N`` -> ``stages.4.j`` for conv5 (``extra.0`` = pool4, conv5_1, ReLU, ...), and the index of
    the fc6/fc7 block in ``extra.0``.
    """
    first, position = {}, 0
    for i, stage in enumerate(stages[:4]):
        for j in range(stage.num_convs):
            first[position] = f"stages.{i}.{j}"
            position += 2  # conv, ReLU
        position += 1  # the stage's max pool
    fifth = {1 + 2 * j: f"stages.4.{j}" for j in range(stages[4].num_convs)}
    return first, fifth, 1 + 2 * stages[4].num_convs


def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``ssd300_vgg16`` state_dict -> cnnlab's layout.

    ``backbone.features.N`` (conv1_1 .. conv4_3) -> ``backbone.stages.i.j.conv``; ``backbone.extra.0.{1,3,5}``
    (conv5) -> ``backbone.stages.4.j.conv``, ``extra.0.7.{1,3}`` -> ``fc6``/``fc7``; ``extra.k.{0,2}`` ->
    ``extras.(k-1).{0,1}.conv``; ``scale_weight`` -> ``l2norm.weight``; ``head.classification_head.module_list``
    / ``head.regression_head.module_list`` -> ``head.cls_logits`` / ``head.bbox_pred``.
    """
    first, fifth, fc_block = _vgg_positions()
    fc = {"1": "fc6", "3": "fc7"}
    out = {}
    for key, value in state_dict.items():
        name = None
        if key == "backbone.scale_weight":
            name = "backbone.l2norm.weight"
        elif m := re.match(r"^backbone\.features\.(\d+)\.(weight|bias)$", key):
            if int(m.group(1)) in first:
                name = f"backbone.{first[int(m.group(1))]}.conv.{m.group(2)}"
        elif m := re.match(rf"^backbone\.extra\.0\.{fc_block}\.(\d+)\.(weight|bias)$", key):
            if m.group(1) in fc:
                name = f"backbone.{fc[m.group(1)]}.conv.{m.group(2)}"
        elif m := re.match(r"^backbone\.extra\.0\.(\d+)\.(weight|bias)$", key):
            if int(m.group(1)) in fifth:
                name = f"backbone.{fifth[int(m.group(1))]}.conv.{m.group(2)}"
        elif m := re.match(r"^backbone\.extra\.([1-9]\d*)\.([02])\.(weight|bias)$", key):
            name = f"backbone.extras.{int(m.group(1)) - 1}.{int(m.group(2)) // 2}.conv.{m.group(3)}"
        elif m := re.match(r"^head\.(classification|regression)_head\.module_list\.(\d+)\.(weight|bias)$", key):
            part = "cls_logits" if m.group(1) == "classification" else "bbox_pred"
            name = f"head.{part}.{m.group(2)}.{m.group(3)}"
        if name is None:
            raise KeyError(f"{key} is not a key of torchvision's ssd300_vgg16")
        out[name] = value
    return out


SSD_FAMILY = Family("SSD", "Liu et al., SSD: Single Shot MultiBox Detector (ECCV 2016)", 2016,
                    "https://arxiv.org/abs/1512.02325")

# SSD300 on COCO (torchvision's, from the paper's Caffe model): the scales of conv4_3 .. conv11_2 and 1.05 for
# the last extra box, and the centres' spacing at 300 px
SSD300_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
SSD300_STEPS = (8, 16, 32, 64, 100, 300)
# VGG's mean pixel (0..1) and no scaling of the 0..255 range: the Caffe VGG's input, torchvision's default
VGG_MEAN = (0.48235, 0.45882, 0.40784)
VGG_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)


@register_model(SSD_FAMILY, task="detection", default_input=(3, 300, 300), pretrained={"torchvision": "ssd300_vgg16"},
                converters={"torchvision": from_torchvision},
                notes="torchvision's layout: VGG-16 base (fc6/fc7 as dilated convs, conv4_3 L2-normalised), "
                      "conv8_2-conv11_2, 8732 default boxes at 300 px; 35.6M parameters at 91 classes. Takes "
                      "torchvision's option names (size, score_thresh, nms_thresh, topk_candidates, ...).")
def ssd300_vgg16(*, num_classes: int = 91, trainable_backbone_layers: int | None = None, **options: Any) -> SSD:
    """torchvision's ``ssd300_vgg16``. ``options``: see :data:`OPTIONS`.

    ``steps`` defaults to SSD300's at 300 x 300 and to the maps' own cells at other sizes (below about 268 px
    the unpadded conv10_2/conv11_2 have no input left: use ``ssd`` for small images).
    """
    defaults = {"transform": SSDTransformConfig(image_mean=VGG_MEAN, image_std=VGG_STD),
                "boxes": DefaultBoxConfig(aspect_ratios=paper_aspect_ratios(6), scales=SSD300_SCALES)}
    parts = split_options(options, **defaults)
    if "steps" not in options and parts["transform"].fixed_size() == (300, 300):
        parts["boxes"] = replace(parts["boxes"], steps=SSD300_STEPS)
    layers = 5 if trainable_backbone_layers is None else trainable_backbone_layers  # all: no backbone weights
    if not isinstance(layers, int) or not 0 <= layers <= 5:
        raise CnnlabError(f"trainable_backbone_layers must be in 0..5 (VGG-16's five stages), got {layers!r}")
    backbone = SSDVGG16(VGG16, SSD300_EXTRAS, trainable_layers=layers)
    for side in parts["transform"].fixed_size():
        if min(backbone.map_sides(side)) < 1:
            raise CnnlabError(f"size={parts['transform'].size!r}: at {side} px the maps of ssd300_vgg16 would be "
                              f"{backbone.map_sides(side)} cells; its unpadded conv10_2/conv11_2 need at least 268 px "
                              "(use ssd(backbone=...) for smaller images)")
    model = SSD(backbone, num_classes, **parts)
    model.model_name = "ssd300_vgg16"  # create_model sets it too; direct calls need it for load_weights' converters
    return model


def _default_stages(feature_info: Sequence, num_maps: int) -> list[int]:
    """The stages of stride >= 8 (ResNet: layer2, layer3, layer4), at most ``num_maps``: SSD's first map is at
    stride 8 (conv4_3); the last stage when every stride is smaller."""
    picked = [i for i, f in enumerate(feature_info) if f.stride >= 8][:num_maps]
    return picked or [len(feature_info) - 1]


# the paper's extra layers' widths (conv8_2 .. conv11_2), continued for more maps; the reduce convs halve them
EXTRA_CHANNELS = (512, 256, 256, 256)


@register_model(SSD_FAMILY, task="detection", default_input=(3, 300, 300),
                notes="Any registered classifier as base (backbone='resnet18'): its stages of stride >= 8 and extra "
                      "stride-2 blocks (num_maps=6 maps in all), default-box scales and aspect ratios, size, "
                      "backbone_weights (a cnnlab run folder or a file), fpn_channels (a feature pyramid on the "
                      "stages), head_blocks (residual prediction blocks per map), concat_deeper (FSSD-style fusion).")
def ssd(
    *, backbone: str = "resnet18", num_classes: int = 91, num_maps: int = 6,
    returned_stages: Sequence[int] | None = None, extra_channels: Sequence[int] | None = None,
    backbone_weights: str | os.PathLike | None = None, trainable_backbone_layers: int | None = None,
    norm_layer: Any = None, fpn_channels: int | None = None, head_blocks: int | Sequence[int] = 0,
    concat_deeper: bool = False, **options: Any,
) -> SSD:
    """SSD on any registered classifier. ``options``: see :data:`OPTIONS`.

    ``returned_stages``: indices into the classifier's ``feature_info`` (default: the stages of stride >= 8);
    ``extra_channels``: the output channels of the extra stride-2 blocks (default: the paper's 512, 256, 256, ...,
    as many as make ``num_maps`` maps; with ``fpn_channels``, that many each). ``fpn_channels``: put a feature
    pyramid of that width on the returned stages (:class:`PyramidBackbone`; DSSD/FSSD's top-down context), so
    the first, high-resolution map also sees the deepest stage; None: the stages' own maps, as the paper.
    ``head_blocks``: residual prediction blocks before the predictors (DSSD's prediction module), as a count per
    map, first map first (``[2, 1]``: two on the stride-8 map, one on the next, none beyond), or one count for
    every map; 0: none, as the paper. ``concat_deeper``: each stage's map also carries the deeper stages' maps,
    resized and concatenated (FSSD's fusion with no new layers; :class:`TappedBackbone`); not with
    ``fpn_channels``.
    """
    parts = split_options(options)  # first: a typo fails before the backbone is built
    if not isinstance(num_maps, int) or num_maps < 1:
        raise CnnlabError(f"num_maps={num_maps!r}: expected a positive int (feature maps with default boxes)")
    from cnnlab.models.registry import create_model

    if returned_stages is None:
        try:
            with torch.device("meta"):  # only the stage table is needed: no weights allocated nor initialised
                feature_info = list(getattr(create_model(backbone), "feature_info", []))
        except (RuntimeError, NotImplementedError):  # an init that needs real values: build it on the CPU
            feature_info = list(getattr(create_model(backbone), "feature_info", []))
        stages = _default_stages(feature_info, num_maps) if feature_info else []
    else:
        stages = list(returned_stages)
    if fpn_channels is not None and (not isinstance(fpn_channels, int) or isinstance(fpn_channels, bool)
                                     or fpn_channels < 1):
        raise CnnlabError(f"fpn_channels={fpn_channels!r}: expected a positive int (the pyramid's width) or None")
    if not isinstance(concat_deeper, bool) or (concat_deeper and fpn_channels is not None):
        raise CnnlabError(f"concat_deeper={concat_deeper!r}: expected true or false, and not with fpn_channels "
                          f"(={fpn_channels!r}): both give the shallow maps the deeper stages, choose one")
    # the classifier cut after the last returned stage; with a pyramid, tapped at each of them
    body = build_backbone(backbone, fpn=fpn_channels is not None,
                          returned_stages=(stages if fpn_channels is not None else stages[-1:]) or None,
                          weights=backbone_weights, trainable_layers=trainable_backbone_layers, norm_layer=norm_layer,
                          fpn_channels=fpn_channels or 256, extra_block="none")
    info = list(body.body.feature_info)
    if any(not isinstance(i, int) or not 0 <= i < len(info) for i in stages) or sorted(set(stages)) != stages:
        raise CnnlabError(f"returned_stages={returned_stages!r}: expected increasing indices in 0..{len(info) - 1} "
                          f"of {backbone}'s stages {[f'{f.module} (stride {f.stride})' for f in info]}")
    if extra_channels is None:
        count = max(0, num_maps - len(stages))
        widths = EXTRA_CHANNELS if fpn_channels is None else (fpn_channels,)
        extra_channels = (widths + widths[-1:] * count)[:count]
    if any(not isinstance(c, int) or c < 1 for c in extra_channels):
        raise CnnlabError(f"extra_channels={list(extra_channels)!r}: expected positive ints (one per extra block)")
    extras = [ExtraBlock(max(1, c // 2), c) for c in extra_channels]
    transform = parts["transform"]
    if body.image_mean is not None and transform.image_mean is None and transform.image_std is None:
        # backbone weights from a run: normalise as that run did (its mean and std, per channel)
        parts["transform"] = replace(transform, image_mean=body.image_mean, image_std=body.image_std)
    tapped = TappedBackbone(body.body, [info[i] for i in stages], extras, concat_deeper) if fpn_channels is None \
        else PyramidBackbone(body, extras)
    if isinstance(head_blocks, int) and not isinstance(head_blocks, bool):
        head_blocks = [head_blocks] * len(tapped.out_channels)
    elif not isinstance(head_blocks, (list, tuple)):
        raise CnnlabError(f"head_blocks={head_blocks!r}: expected an int or a list of ints (prediction blocks per "
                          "feature map)")
    model = SSD(tapped, num_classes, head_blocks=list(head_blocks), **parts)
    model.model_name = "ssd"
    return model
