"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"): a one-stage detector on an FPN.

An FPN gives the maps P3..P7 (strides 8..128); at every position of every map A = 9 anchors (3 sizes x 3
aspect ratios; sizes 32..512 on P3..P7, each times 2^0, 2^(1/3), 2^(2/3)). Two small subnets shared by every
level, four 3x3 conv + ReLU layers each, predict per anchor K class logits (sigmoids, not a softmax) and
four box deltas. Training labels an anchor positive at IoU >= 0.5 with a box (or when it is a box's best
anchor), negative below 0.4, ignored between, and sums the focal loss over *all* anchors (no sampling: the
focal loss down-weights the easy negatives instead) divided by the number of positives, plus an L1 box loss.
The last classification conv starts with a bias giving every anchor the probability pi = 0.01 of each
class, so the many background anchors do not swamp the first iterations (§4.1, "Initialization").

:class:`RetinaNet` takes a backbone and one small config per part
(:class:`~cnnlab.detection.faster_rcnn.TransformConfig`, :class:`AnchorConfig`, :class:`HeadConfig`,
:class:`PostprocessConfig`). The registered builders take torchvision's option names flat (``min_size``,
``score_thresh``, ``topk_candidates``, ...; see :data:`OPTIONS`):

- ``retinanet_resnet50_fpn``: torchvision's model (ResNet-50, FPN on layer2-4, P6 and P7 by 3x3 stride-2 convs
  from P5); ``cnnlab.load_weights`` reads torchvision's state_dict.
- ``retinanet``: any registered classifier as backbone (``backbone="resnet18"``), anchor sizes, ratios and scales,
  backbone weights from a cnnlab run folder or a file.

Parameter names follow torchvision's (``head.classification_head.cls_logits``, ``head.regression_head.bbox_reg``),
except the subnets' convs, which are cnnlab's ``ConvNormAct`` (``conv.0.conv`` for torchvision's ``conv.0.0``).
The class logits have ``num_classes`` channels per anchor including the background's (channel 0, never a
positive), as torchvision's, so that its checkpoints load; detections never have label 0 unless
``background_detections=True`` (torchvision's output exactly).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image

from cnnlab._errors import CnnlabError
from cnnlab.detection.anchor_fit import AnchorCheck, generator_shapes
from cnnlab.detection.anchors import AnchorGenerator
from cnnlab.detection.backbone import build_backbone
from cnnlab.detection.boxes import BoxCoder, Matcher, batched_nms
from cnnlab.detection.faster_rcnn import FasterRCNN, TransformConfig
from cnnlab.detection.losses import check_focal_parameters, focal_classification_loss, l1_box_loss
from cnnlab.detection.options import check_inputs, group_options
from cnnlab.detection.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform
from cnnlab.layers import ConvNormAct
from cnnlab.models.registry import Family, StateDict, register_model

__all__ = ["RetinaNet", "AnchorConfig", "HeadConfig", "PostprocessConfig", "OPTIONS", "split_options",
           "RetinaNetClassificationHead", "RetinaNetRegressionHead", "RetinaNetHead", "RetinaNetLoss",
           "RetinaNetPostprocess", "retinanet_anchor_sizes", "from_torchvision", "retinanet_resnet50_fpn", "retinanet"]


# -- one config per part ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnchorConfig:
    """Anchors per FPN level (Lin et al. 2017, §4: areas 32² to 512² on P3-P7, 3 scales x 3 ratios).

    ``sizes``: per level a base size (times each of ``scales``) or a tuple of sizes used as given; None: 4 x the
    level's stride (32 on P3 ... 512 on P7). Sizes are whole pixels (``int(base * scale)``, as torchvision).
    ``aspect_ratios``: height / width, the same on every level.
    """

    sizes: tuple | None = None
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    scales: tuple = (1.0, 2 ** (1.0 / 3), 2 ** (2.0 / 3))


@dataclass(frozen=True)
class HeadConfig:
    """The two subnets and their training: matcher IoUs, focal loss, prior probability (torchvision's defaults)."""

    num_convs: int = 4
    prior_probability: float = 0.01
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0


@dataclass(frozen=True)
class PostprocessConfig:
    """From per-anchor scores to detections (torchvision's defaults).

    Per level, the ``topk_candidates`` best (anchor, class) pairs scoring above ``score_thresh``; then NMS per
    class at ``nms_thresh`` over all levels and the ``detections_per_img`` best. ``background_detections``: also
    report class 0 (the background channel), as torchvision does.
    """

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000
    background_detections: bool = False


# flat option names -> (part, field); torchvision's names where it has them
OPTIONS: dict[str, tuple[str, str]] = {
    **{f.name: ("transform", f.name) for f in fields(TransformConfig)},
    "anchor_sizes": ("anchors", "sizes"), "aspect_ratios": ("anchors", "aspect_ratios"),
    "anchor_scales": ("anchors", "scales"),
    **{f.name: ("head", f.name) for f in fields(HeadConfig)},
    **{f.name: ("postprocess", f.name) for f in fields(PostprocessConfig)},
}
PARTS = ("transform", "anchors", "head", "postprocess")


def split_options(options: dict[str, Any]) -> tuple[TransformConfig, AnchorConfig, HeadConfig, PostprocessConfig]:
    """Flat torchvision-style options -> the four part configs."""
    parts = group_options("RetinaNet", options, {"transform": TransformConfig(), "anchors": AnchorConfig(),
                                                  "head": HeadConfig(), "postprocess": PostprocessConfig()}, OPTIONS)
    return tuple(parts[p] for p in PARTS)  # type: ignore[return-value]


def _check_configs(head: HeadConfig, post: PostprocessConfig) -> None:
    check_focal_parameters(head.focal_alpha, head.focal_gamma)
    if not 0 < head.prior_probability < 1:
        raise CnnlabError(f"prior_probability is the initial foreground probability of every anchor, in (0, 1) "
                          f"(the paper's 0.01), got {head.prior_probability!r}")
    if not isinstance(head.num_convs, int) or head.num_convs < 0:
        raise CnnlabError(f"num_convs (3x3 conv layers per subnet) must be an int >= 0 (the paper's 4), "
                          f"got {head.num_convs!r}")
    if not 0 <= head.bg_iou_thresh <= head.fg_iou_thresh <= 1:
        raise CnnlabError(f"anchor matching needs 0 <= bg_iou_thresh <= fg_iou_thresh <= 1 (the paper's 0.4 and 0.5), "
                          f"got bg_iou_thresh={head.bg_iou_thresh}, fg_iou_thresh={head.fg_iou_thresh}")
    if not 0 <= post.score_thresh < 1:
        raise CnnlabError(f"score_thresh is a probability in [0, 1), got {post.score_thresh!r}")
    if not 0 <= post.nms_thresh <= 1:
        raise CnnlabError(f"nms_thresh is an IoU in [0, 1], got {post.nms_thresh!r}")
    for name in ("detections_per_img", "topk_candidates"):
        value = getattr(post, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CnnlabError(f"{name} must be an int >= 1, got {value!r}")


def retinanet_anchor_sizes(anchors: AnchorConfig, strides: Sequence[int] | None, num_maps: int) -> tuple:
    """Per feature map, the anchor sizes :class:`AnchorConfig` describes (see there)."""
    if anchors.sizes is None:
        if strides is None:
            raise CnnlabError("give anchor_sizes (one per feature map): this backbone does not list its strides")
        bases: Sequence = [4 * s for s in strides]
    else:
        bases = anchors.sizes
        if not isinstance(bases, (list, tuple)) or len(bases) != num_maps:
            raise CnnlabError(f"anchor_sizes={anchors.sizes!r} must give one base size (or tuple of sizes) per feature "
                              f"map; the backbone gives {num_maps} maps (strides {list(strides or [])})")
    scales = anchors.scales
    if not isinstance(scales, (list, tuple)) or not scales \
            or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
        raise CnnlabError(f"anchor_scales must be a non-empty tuple of positive numbers (the paper's 1, 2^(1/3), "
                          f"2^(2/3)), got {scales!r}")
    # int() as torchvision's _default_anchorgen: whole-pixel sizes (32, 40, 50 on P3)
    return tuple(tuple(base) if isinstance(base, (list, tuple)) else tuple(int(base * s) for s in scales)
                 for base in bases)


# -- the subnets ------------------------------------------------------------------------------------------------
def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """(B, A * per_anchor, H, W) -> (B, H * W * A, per_anchor): position-major, then anchor, as the anchors."""
    n, _, h, w = x.shape
    return x.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def _subnet(in_channels: int, num_convs: int, norm_layer: Any) -> nn.Sequential:
    return nn.Sequential(*[ConvNormAct(in_channels, in_channels, 3, norm_layer=norm_layer) for _ in range(num_convs)])


def _prior_init(conv: nn.Conv2d, prior_probability: float) -> None:
    # sigmoid(bias) = pi: every anchor starts as foreground with probability pi (§4.1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1 - prior_probability) / prior_probability))


class RetinaNetClassificationHead(nn.Module):
    """The classification subnet: ``num_convs`` 3x3 conv + ReLU, then a 3x3 conv to A x K logits per position.

    Args:
        in_channels: channels of the FPN maps.
        num_anchors: anchors per position (A).
        num_classes: logits per anchor (K + 1 with the background channel, as torchvision).
        num_convs: the 3x3 conv + ReLU layers before the last conv (paper: 4).
        prior_probability: the initial probability of each class at every anchor (paper: 0.01).
        norm_layer: a normalisation factory after each conv; None (the paper's): none.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, num_convs: int = 4,
                 prior_probability: float = 0.01, norm_layer: Any = None) -> None:
        super().__init__()
        self.conv = _subnet(in_channels, num_convs, norm_layer)
        for layer in self.conv.modules():
            if isinstance(layer, nn.Conv2d):  # N(0, 0.01), zero biases (§4.1)
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        _prior_init(self.cls_logits, prior_probability)
        self.num_anchors, self.num_classes, self.prior_probability = num_anchors, num_classes, prior_probability

    def forward(self, features: list[Tensor]) -> Tensor:
        """Per-map (B, C, H, W) -> (B, sum of H W A, K) logits."""
        return torch.cat([_flatten(self.cls_logits(self.conv(x)), self.num_classes) for x in features], dim=1)


class RetinaNetRegressionHead(nn.Module):
    """The box subnet: ``num_convs`` 3x3 conv + ReLU, then a 3x3 conv to A x 4 deltas per position (class-agnostic).

    Args:
        in_channels: channels of the FPN maps.
        num_anchors: anchors per position (A).
        num_convs: the 3x3 conv + ReLU layers before the last conv (paper: 4).
        norm_layer: a normalisation factory after each conv; None (the paper's): none.
    """

    def __init__(self, in_channels: int, num_anchors: int, *, num_convs: int = 4, norm_layer: Any = None) -> None:
        super().__init__()
        self.conv = _subnet(in_channels, num_convs, norm_layer)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Per-map (B, C, H, W) -> (B, sum of H W A, 4) deltas."""
        return torch.cat([_flatten(self.bbox_reg(self.conv(x)), 4) for x in features], dim=1)


class RetinaNetHead(nn.Module):
    """Both subnets, shared by every pyramid level.

    Args:
        in_channels, num_anchors, num_classes: as the subnets take them.
        config: the number of convs and the prior probability.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, config: HeadConfig | None = None) -> None:
        super().__init__()
        config = config or HeadConfig()
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes, num_convs=config.num_convs,
            prior_probability=config.prior_probability)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, num_convs=config.num_convs)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(features), "bbox_regression": self.regression_head(features)}


# -- training and inference -------------------------------------------------------------------------------------
class RetinaNetLoss(nn.Module):
    """Match the anchors to the boxes; the focal loss on the classes and the L1 loss on the positives' boxes.

    Returns torchvision's names: ``classification`` and ``bbox_regression``.

    Args:
        config: the matcher's IoUs (0.5 / 0.4, low-quality matches kept) and the focal loss' alpha and gamma.
        box_coder: the anchors' box coding (weights 1, 1, 1, 1).
    """

    def __init__(self, config: HeadConfig, box_coder: BoxCoder) -> None:
        super().__init__()
        self.proposal_matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=True)
        self.box_coder = box_coder
        self.alpha, self.gamma = config.focal_alpha, config.focal_gamma

    def match(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Per image, each anchor's box index, or ``Matcher.BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``."""
        return [self.proposal_matcher(box_iou(t["boxes"], a)) for a, t in zip(anchors, targets)]

    def forward(self, head_outputs: dict[str, Tensor], anchors: list[Tensor],
                targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        matched = self.match(anchors, targets)
        return {
            "classification": focal_classification_loss(head_outputs["cls_logits"], [t["labels"] for t in targets],
                                                        matched, alpha=self.alpha, gamma=self.gamma),
            "bbox_regression": l1_box_loss(head_outputs["bbox_regression"], anchors, [t["boxes"] for t in targets],
                                           matched, self.box_coder),
        }


class RetinaNetPostprocess(nn.Module):
    """Per-anchor logits and deltas -> detections (boxes in batch pixels, labels, scores) per image.

    Args:
        config: thresholds and counts (:class:`PostprocessConfig`).
        box_coder: decodes the deltas against the anchors.
    """

    def __init__(self, config: PostprocessConfig, box_coder: BoxCoder) -> None:
        super().__init__()
        self.config = config
        self.box_coder = box_coder

    def forward(self, head_outputs: dict[str, Tensor], anchors: list[Tensor], anchors_per_level: list[int],
                image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        cfg = self.config
        first = 0 if cfg.background_detections else 1  # channel 0 is the background's
        detections = []
        for logits_i, deltas_i, anchors_i, size in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                                       anchors, image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            levels = zip(logits_i.split(anchors_per_level), deltas_i.split(anchors_per_level),
                         anchors_i.split(anchors_per_level))
            for logits, deltas, level_anchors in levels:
                logits = logits[:, first:]
                classes = logits.shape[-1]
                scores = torch.sigmoid(logits).flatten()  # (anchors x classes,), anchor-major
                candidates = torch.where(scores > cfg.score_thresh)[0]
                scores, order = scores[candidates].topk(min(cfg.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                anchor_idx = torch.div(candidates, classes, rounding_mode="floor")
                boxes = self.box_coder.decode(deltas[anchor_idx], level_anchors[anchor_idx]).reshape(-1, 4)
                boxes_all.append(clip_boxes_to_image(boxes, size))
                scores_all.append(scores)
                labels_all.append(candidates % classes + first)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]  # NMS per class
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


# -- the model --------------------------------------------------------------------------------------------------
class RetinaNet(AnchorCheck, nn.Module):
    """RetinaNet on a backbone that returns FPN maps of ``out_channels`` channels each.

    ``model(images, targets)``: the losses ``classification`` and ``bbox_regression`` in training, one dict of
    ``boxes``, ``labels``, ``scores`` per image (at its input size) in eval.

    Args:
        backbone: images -> ``OrderedDict`` of feature maps; its ``strides`` give the default anchor sizes.
        num_classes: classes including the background (K + 1, as torchvision).
        transform, anchors, head, postprocess: the parts' configs (defaults: torchvision's).
    """

    head_name = "head.classification_head.cls_logits"  # the class-specific layer (other class counts, transfer)

    anchor_setting = "model.options.anchor_sizes / aspect_ratios / anchor_scales"

    def anchor_shapes(self) -> Tensor:
        return generator_shapes(self.anchor_generator)

    def __init__(self, backbone: nn.Module, num_classes: int, *, transform: TransformConfig | None = None,
                 anchors: AnchorConfig | None = None, head: HeadConfig | None = None,
                 postprocess: PostprocessConfig | None = None) -> None:
        super().__init__()
        transform, anchors = transform or TransformConfig(), anchors or AnchorConfig()
        head, postprocess = head or HeadConfig(), postprocess or PostprocessConfig()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected >= 2, "
                              f"got {num_classes!r}")
        _check_configs(head, postprocess)
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int):
            raise CnnlabError("the backbone needs an out_channels attribute (the channels of its feature maps)")
        names = list(getattr(backbone, "names", ["0"]))
        self.anchor_generator = AnchorGenerator(
            retinanet_anchor_sizes(anchors, getattr(backbone, "strides", None), len(names)), anchors.aspect_ratios)
        per_location = self.anchor_generator.num_anchors_per_location()
        if len(set(per_location)) != 1:
            raise CnnlabError(f"anchor_sizes x aspect_ratios give {per_location} anchors per position on the feature "
                              "maps; one head serves every map, so each map needs the same number")

        self.transform = DetectionTransform(transform.min_size, transform.max_size, transform.image_mean,
                                            transform.image_std, transform.size_divisible, transform.fixed_size,
                                            transform.fixed_scale)
        self.backbone = backbone
        self.head = RetinaNetHead(channels, per_location[0], num_classes, head)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.loss = RetinaNetLoss(head, self.box_coder)
        self.postprocess = RetinaNetPostprocess(postprocess, self.box_coder)
        self.num_classes = num_classes
        self.config = {"transform": transform, "anchors": anchors, "head": head, "postprocess": postprocess}

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        original_sizes = check_inputs(images, targets, self.training, self.num_classes)

        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        features = [features] if isinstance(features, Tensor) else list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        if self.training:
            return self.loss(head_outputs, anchors, targets)
        per_level = [f.shape[-2] * f.shape[-1] * self.head.classification_head.num_anchors for f in features]
        detections = self.postprocess(head_outputs, anchors, per_level, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh last classification conv for ``num_classes`` (K + 1), with the prior-probability init."""
        if not isinstance(num_classes, int) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1): expected >= 2, got {num_classes!r}")
        cls = self.head.classification_head
        old = cls.cls_logits
        new = nn.Conv2d(old.in_channels, cls.num_anchors * num_classes, kernel_size=3, padding=1)
        _prior_init(new, cls.prior_probability)
        cls.cls_logits = new.to(device=old.weight.device, dtype=old.weight.dtype)
        cls.num_classes = num_classes
        self.num_classes = num_classes

    # torchvision's COCO checkpoint has FrozenBatchNorm2d (no counters): the same fitting as Faster R-CNN's
    filter_state_dict = FasterRCNN.filter_state_dict


# -- torchvision's checkpoint ------------------------------------------------------------------------------------
_SUBNET_CONV = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)(\.0)?\.(weight|bias)$")


def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``retinanet_resnet50_fpn`` state_dict -> cnnlab's layout.

    The ResNet body is renamed as cnnlab's ResNet converter does; the FPN (with ``extra_blocks.p6``/``p7``) and the
    heads' last convs keep torchvision's names; the subnets' convs ``conv.i.0`` (and the v1 checkpoints'
    ``conv.2i``, as torchvision's COCO weights) become ``conv.i.conv``.
    """
    from cnnlab.models.resnet import from_torchvision as resnet_from_torchvision

    prefix = "backbone.body."
    body = resnet_from_torchvision({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    out = {prefix + k: v for k, v in body.items()}
    subnet_keys = [k for k in state_dict if _SUBNET_CONV.match(k)]
    v1 = bool(subnet_keys) and not any(_SUBNET_CONV.match(k).group(3) for k in subnet_keys)  # type: ignore[union-attr]
    for key, value in state_dict.items():
        if key.startswith(prefix):
            continue
        if key.startswith(("backbone.fpn.", "head.classification_head.cls_logits.", "head.regression_head.bbox_reg.")):
            out[key] = value
        elif m := _SUBNET_CONV.match(key):
            index = int(m.group(2)) // 2 if v1 else int(m.group(2))  # v1: Conv2d, ReLU, Conv2d, ... in one Sequential
            out[f"{m.group(1)}.{index}.conv.{m.group(4)}"] = value
        else:
            raise KeyError(f"{key} is not a key of torchvision's retinanet_resnet50_fpn")
    return out


RETINANET = Family("RetinaNet", "Lin et al., Focal Loss for Dense Object Detection (ICCV 2017)", 2017,
                   "https://arxiv.org/abs/1708.02002")


def _build(name: str, backbone: str, *, num_classes: int, returned_stages: Sequence[int] | None,
           backbone_weights: str | os.PathLike | None, trainable_backbone_layers: int | None, norm_layer: Any,
           fpn_channels: int, extra_block: str, in_channels: int, options: dict[str, Any]) -> RetinaNet:
    transform, anchors, head, postprocess = split_options(options)  # first: a typo fails before the backbone is built
    _check_configs(head, postprocess)
    if returned_stages is None:
        returned_stages = _default_stages(backbone, in_channels)
    body = build_backbone(backbone, fpn=True, returned_stages=returned_stages, weights=backbone_weights,
                          trainable_layers=trainable_backbone_layers, norm_layer=norm_layer,
                          fpn_channels=fpn_channels, in_channels=in_channels, extra_block=extra_block)
    if transform.image_mean is None and transform.image_std is None:
        if body.image_mean is not None:  # backbone weights from a run: normalise as that run did
            transform = replace(transform, image_mean=body.image_mean, image_std=body.image_std)
        elif in_channels != 3:  # ImageNet's statistics averaged over R, G and B, for each channel
            transform = replace(transform, image_mean=(sum(IMAGENET_MEAN) / 3,) * in_channels,
                                image_std=(sum(IMAGENET_STD) / 3,) * in_channels)
    model = RetinaNet(body, num_classes, transform=transform, anchors=anchors, head=head, postprocess=postprocess)
    model.model_name = name  # create_model sets it too; direct calls need it for load_weights' converters
    return model


def _default_stages(backbone: str, in_channels: int) -> list[int]:
    """The classifier's stages of stride >= 8 (ResNet: layer2-4, C3-C5, as the paper); the last one if none is."""
    from cnnlab.models.registry import create_model

    try:
        with torch.device("meta"):  # only the feature_info table is read: no memory, no init
            model = create_model(backbone, in_channels=in_channels)
    except CnnlabError:
        raise  # an unknown name, with its suggestions
    except Exception:  # a builder that cannot run on the meta device
        model = create_model(backbone, in_channels=in_channels)
    info = list(getattr(model, "feature_info", []))
    picked = [i for i, f in enumerate(info) if f.stride >= 8]
    return picked or [len(info) - 1] if info else [0]


@register_model(RETINANET, task="detection", default_input=(3, 800, 800),
                pretrained={"torchvision": "retinanet_resnet50_fpn"}, converters={"torchvision": from_torchvision},
                notes="torchvision's layout: ResNet-50 + FPN P3-P7 (P6, P7 by convs from P5), 9 anchors, focal "
                      "loss; 34.0M parameters. Takes torchvision's option names (min_size, score_thresh, "
                      "topk_candidates, ...).")
def retinanet_resnet50_fpn(
    *, num_classes: int = 91, backbone_weights: str | os.PathLike | None = None,
    trainable_backbone_layers: int | None = None, norm_layer: Any = None, in_channels: int = 3, **options: Any,
) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn`` (v1). ``options``: see :data:`OPTIONS`."""
    return _build("retinanet_resnet50_fpn", "resnet50", num_classes=num_classes, returned_stages=(2, 3, 4),
                  backbone_weights=backbone_weights, trainable_backbone_layers=trainable_backbone_layers,
                  norm_layer=norm_layer, fpn_channels=256, extra_block="p6p7", in_channels=in_channels, options=options)


@register_model(RETINANET, task="detection", default_input=(3, 800, 800),
                notes="Any registered classifier as backbone (backbone='resnet18'), FPN on its stride >= 8 stages "
                      "+ P6, P7; anchor_sizes, aspect_ratios, anchor_scales, backbone_weights (a cnnlab run folder "
                      "or a file).")
def retinanet(
    *, backbone: str = "resnet18", num_classes: int = 91, returned_stages: Sequence[int] | None = None,
    backbone_weights: str | os.PathLike | None = None, trainable_backbone_layers: int | None = None,
    norm_layer: Any = None, fpn_channels: int = 256, extra_block: str = "p6p7", in_channels: int = 3, **options: Any,
) -> RetinaNet:
    """RetinaNet on any registered classifier. ``options``: torchvision's names, see :data:`OPTIONS`."""
    return _build("retinanet", backbone, num_classes=num_classes, returned_stages=returned_stages,
                  backbone_weights=backbone_weights, trainable_backbone_layers=trainable_backbone_layers,
                  norm_layer=norm_layer, fpn_channels=fpn_channels, extra_block=extra_block, in_channels=in_channels,
                  options=options)
