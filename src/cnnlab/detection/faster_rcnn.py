"""Faster R-CNN (Ren et al. 2015): a region proposal network and Fast R-CNN's RoI heads on one backbone.

:class:`FasterRCNN` takes a backbone and one small config per part (:class:`TransformConfig`,
:class:`RPNConfig`, :class:`BoxHeadConfig`). The registered builders take torchvision's option names flat
(``min_size``, ``rpn_pre_nms_top_n_test``, ``box_score_thresh``, ...; see :data:`OPTIONS`), so that code
written for ``torchvision.models.detection.fasterrcnn_resnet50_fpn`` carries over:

- ``fasterrcnn_resnet50_fpn``: torchvision's model (ResNet-50, FPN on layer1-4 + a max-pooled level,
  FrozenBatchNorm2d and 3 trainable stages when weights are loaded); ``cnnlab.load_weights`` reads
  torchvision's state_dict (its ``weights="torchvision"`` is the COCO checkpoint).
- ``faster_rcnn``: any registered classifier as backbone (``backbone="resnet18"``), with or without FPN,
  anchor sizes and ratios, RoI output size, and backbone weights from a cnnlab run folder or a file.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from cnnlab._errors import CnnlabError
from cnnlab.detection.anchor_fit import AnchorCheck, generator_shapes
from cnnlab.detection.anchors import AnchorGenerator
from cnnlab.detection.backbone import build_backbone
from cnnlab.detection.generalized_rcnn import GeneralizedRCNN
from cnnlab.detection.options import group_options
from cnnlab.detection.roi_heads import FastRCNNPredictor, RoIHeads, RoIPool, TwoMLPHead
from cnnlab.detection.rpn import RegionProposalNetwork, RPNHead
from cnnlab.detection.transform import DetectionTransform
from cnnlab.models.registry import Family, StateDict, register_model

__all__ = ["FasterRCNN", "TransformConfig", "RPNConfig", "BoxHeadConfig", "split_options",
           "fasterrcnn_resnet50_fpn", "faster_rcnn"]


# -- one config per part ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformConfig:
    """Resizing and normalisation (torchvision's defaults: short side 800, long side at most 1333, ImageNet stats)."""

    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    size_divisible: int = 32
    fixed_size: tuple[int, int] | None = None
    fixed_scale: float | None = None  # every image by this factor (1.0: at its own size) instead of min/max_size


@dataclass(frozen=True)
class RPNConfig:
    """The anchors and the region proposal network (Ren et al. 2015, §3.1; torchvision's defaults).

    ``anchor_sizes`` None: one size of 8 x stride per map with an FPN (32..512 on ResNet's P2..P6), or
    (8, 16, 32) x stride on a single map (128, 256, 512 at stride 16: the paper's).
    """

    anchor_sizes: tuple | None = None
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0


@dataclass(frozen=True)
class BoxHeadConfig:
    """RoI pooling, the box head and Fast R-CNN's training and inference settings.

    ``roi_pool``: ``"align"`` (RoIAlign through ``MultiScaleRoIAlign``, torchvision's) or ``"pool"``
    (Fast R-CNN's RoI max pooling; one feature map only).
    """

    roi_output_size: int = 7
    sampling_ratio: int = 2
    roi_pool: str = "align"
    representation_size: int = 1024
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] | None = None


# torchvision's flat option names -> (part, field)
OPTIONS: dict[str, tuple[str, str]] = {
    **{f.name: ("transform", f.name) for f in fields(TransformConfig)},
    "anchor_sizes": ("rpn", "anchor_sizes"), "aspect_ratios": ("rpn", "aspect_ratios"),
    **{f"rpn_{f.name}": ("rpn", f.name) for f in fields(RPNConfig) if f.name not in ("anchor_sizes", "aspect_ratios")},
    **{f"box_{f.name}": ("box", f.name) for f in fields(BoxHeadConfig)
       if f.name not in ("roi_output_size", "sampling_ratio", "roi_pool", "representation_size", "bbox_reg_weights")},
    "roi_output_size": ("box", "roi_output_size"), "sampling_ratio": ("box", "sampling_ratio"),
    "roi_pool": ("box", "roi_pool"), "representation_size": ("box", "representation_size"),
    "bbox_reg_weights": ("box", "bbox_reg_weights"),
}


def split_options(options: dict[str, Any], *, transform: TransformConfig | None = None, rpn: RPNConfig | None = None,
                  box: BoxHeadConfig | None = None) -> tuple[TransformConfig, RPNConfig, BoxHeadConfig]:
    """Flat torchvision-style options -> the three part configs (starting from the given ones)."""
    parts = group_options("Faster R-CNN", options, {"transform": transform or TransformConfig(),
                                                     "rpn": rpn or RPNConfig(), "box": box or BoxHeadConfig()}, OPTIONS)
    return parts["transform"], parts["rpn"], parts["box"]


# -- the model --------------------------------------------------------------------------------------------------
class FasterRCNN(AnchorCheck, GeneralizedRCNN):
    """Faster R-CNN on a backbone with an ``out_channels`` attribute.

    Args:
        backbone: images -> ``OrderedDict`` of feature maps of ``out_channels`` channels; its ``names``
            and ``strides`` (as :class:`~cnnlab.detection.backbone.Backbone` has) give the maps' keys and strides.
        num_classes: classes including the background (K + 1).
        transform, rpn, box: the parts' configs (defaults: torchvision's).
    """

    anchor_setting = "model.options.anchor_sizes / aspect_ratios"

    def anchor_shapes(self) -> Tensor:
        return generator_shapes(self.rpn.anchor_generator)

    def __init__(self, backbone: nn.Module, num_classes: int, *, transform: TransformConfig | None = None,
                 rpn: RPNConfig | None = None, box: BoxHeadConfig | None = None) -> None:
        transform, rpn, box = transform or TransformConfig(), rpn or RPNConfig(), box or BoxHeadConfig()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected >= 2, "
                              f"got {num_classes!r}")
        channels = getattr(backbone, "out_channels", None)
        if not isinstance(channels, int):
            found = getattr(backbone, "channels", None)
            raise CnnlabError(f"without an FPN the returned stages must have the same channels (one RPN head serves "
                              f"them all), got {found}; return one stage or use fpn=True" if found else
                              "the backbone needs an out_channels attribute (the channels of its feature maps)")
        names = list(getattr(backbone, "names", ["0"]))
        strides = getattr(backbone, "strides", None)

        anchors = AnchorGenerator(_anchor_sizes(rpn, names, strides), rpn.aspect_ratios)
        if len(anchors.sizes) != len(names):
            raise CnnlabError(f"anchor_sizes={rpn.anchor_sizes!r} has {len(anchors.sizes)} entries but the backbone gives "
                              f"{len(names)} feature maps ({', '.join(names)}); give one tuple of sizes per map")
        per_location = anchors.num_anchors_per_location()
        if len(set(per_location)) != 1:
            raise CnnlabError(f"anchor_sizes x aspect_ratios give {per_location} anchors per position on the feature maps; "
                              "one RPN head serves every map, so each map needs the same number")
        rpn_module = RegionProposalNetwork(
            anchors, RPNHead(channels, per_location[0]),
            fg_iou_thresh=rpn.fg_iou_thresh, bg_iou_thresh=rpn.bg_iou_thresh,
            batch_size_per_image=rpn.batch_size_per_image, positive_fraction=rpn.positive_fraction,
            pre_nms_top_n_train=rpn.pre_nms_top_n_train, pre_nms_top_n_test=rpn.pre_nms_top_n_test,
            post_nms_top_n_train=rpn.post_nms_top_n_train, post_nms_top_n_test=rpn.post_nms_top_n_test,
            nms_thresh=rpn.nms_thresh, score_thresh=rpn.score_thresh,
        )
        pooled = [n for n in names if n != "pool"]  # the FPN's extra level is for proposals only (torchvision)
        size = box.roi_output_size
        if box.roi_pool == "align":
            roi_pool: nn.Module = MultiScaleRoIAlign(pooled, size, box.sampling_ratio)
        elif box.roi_pool == "pool":
            if len(pooled) != 1:
                raise CnnlabError(f"roi_pool='pool' pools one feature map; this backbone gives {len(pooled)} "
                                  "(use roi_pool='align' with an FPN, or fpn=False)")
            roi_pool = RoIPool(pooled[0], size)
        else:
            raise CnnlabError(f"roi_pool must be 'align' or 'pool', got {box.roi_pool!r}")
        head = TwoMLPHead(channels * size * size, box.representation_size)
        roi_heads = RoIHeads(
            roi_pool, head, FastRCNNPredictor(box.representation_size, num_classes),
            fg_iou_thresh=box.fg_iou_thresh, bg_iou_thresh=box.bg_iou_thresh,
            batch_size_per_image=box.batch_size_per_image, positive_fraction=box.positive_fraction,
            bbox_reg_weights=box.bbox_reg_weights, score_thresh=box.score_thresh, nms_thresh=box.nms_thresh,
            detections_per_img=box.detections_per_img,
        )
        det_transform = DetectionTransform(transform.min_size, transform.max_size, transform.image_mean,
                                           transform.image_std, transform.size_divisible, transform.fixed_size,
                                           transform.fixed_scale)
        super().__init__(det_transform, backbone, rpn_module, roi_heads, num_classes)
        self.config = {"transform": transform, "rpn": rpn, "box": box}

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh box predictor for ``num_classes`` (K + 1): fine-tuning on new classes (torchvision's recipe)."""
        old = self.roi_heads.box_predictor
        new = FastRCNNPredictor(old.cls_score.in_features, num_classes).to(old.cls_score.weight.device)
        self.roi_heads.box_predictor = new
        self.num_classes = num_classes

    def filter_state_dict(self, state_dict: StateDict) -> StateDict:
        """Fit BatchNorm2d's ``num_batches_tracked`` counters between frozen and trainable batch norms.

        torchvision's COCO checkpoint has FrozenBatchNorm2d (no counter); its random-init model BatchNorm2d.
        """
        own = self.state_dict()
        out = {k: v for k, v in state_dict.items() if not (k.endswith("num_batches_tracked") and k not in own)}
        for k, v in own.items():
            if k.endswith("num_batches_tracked") and k not in out and k.rsplit(".", 1)[0] + ".running_mean" in out:
                out[k] = torch.zeros_like(v)
        return out


def _anchor_sizes(rpn: RPNConfig, names: list[str], strides: Sequence[int] | None) -> tuple:
    if rpn.anchor_sizes is not None:
        return rpn.anchor_sizes
    if strides is None:
        raise CnnlabError("give anchor_sizes (one tuple per feature map): this backbone does not list its strides")
    if len(names) > 1:
        return tuple((8 * s,) for s in strides)
    return (tuple(m * strides[0] for m in (8, 16, 32)),)


# -- torchvision's checkpoint ------------------------------------------------------------------------------------
def from_torchvision(state_dict: StateDict) -> StateDict:
    """torchvision ``fasterrcnn_resnet50_fpn`` state_dict -> cnnlab's layout.

    The ResNet body is renamed as cnnlab's ResNet converter does (``conv1`` -> ``stem.conv`` ...); the FPN,
    RPN head and RoI heads keep torchvision's names, except the RPN's 3x3 conv (``conv.0.0`` -> ``conv.0.conv``).
    """
    from cnnlab.models.resnet import from_torchvision as resnet_from_torchvision

    prefix = "backbone.body."
    body = resnet_from_torchvision({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    out = {prefix + k: v for k, v in body.items()}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            continue
        if key.startswith(("backbone.fpn.", "roi_heads.", "rpn.head.cls_logits.", "rpn.head.bbox_pred.")):
            out[key] = value
        elif m := re.match(r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", key):  # also torchvision's v1 name
            out[f"rpn.head.conv.0.conv.{m.group(1)}"] = value
        else:
            raise KeyError(f"{key} is not a key of torchvision's fasterrcnn_resnet50_fpn")
    return out


FASTER_RCNN = Family("Faster R-CNN", "Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region "
                     "Proposal Networks (NeurIPS 2015)", 2015, "https://arxiv.org/abs/1506.01497")


def _build(name: str, backbone: str, *, fpn: bool, num_classes: int, returned_stages: Sequence[int] | None,
           backbone_weights: str | os.PathLike | None, trainable_backbone_layers: int | None,
           norm_layer: Any, fpn_channels: int, options: dict[str, Any]) -> FasterRCNN:
    transform, rpn, box = split_options(options)  # first: a typo fails before the backbone is built
    body = build_backbone(backbone, fpn=fpn, returned_stages=returned_stages, weights=backbone_weights,
                          trainable_layers=trainable_backbone_layers, norm_layer=norm_layer,
                          fpn_channels=fpn_channels)
    if body.image_mean is not None and transform.image_mean is None and transform.image_std is None:
        # backbone weights from a run: normalise as that run did (its mean and std, per channel)
        transform = replace(transform, image_mean=body.image_mean, image_std=body.image_std)
    model = FasterRCNN(body, num_classes, transform=transform, rpn=rpn, box=box)
    model.model_name = name  # create_model sets it too; direct calls need it for load_weights' converters
    return model


@register_model(FASTER_RCNN, task="detection", default_input=(3, 800, 800),
                pretrained={"torchvision": "fasterrcnn_resnet50_fpn"}, converters={"torchvision": from_torchvision},
                notes="torchvision's layout: ResNet-50 + FPN (layer1-4, P6 by max pooling); 41.8M parameters. "
                      "Takes torchvision's option names (min_size, box_score_thresh, rpn_pre_nms_top_n_test, ...).")
def fasterrcnn_resnet50_fpn(
    *, num_classes: int = 91, backbone_weights: str | os.PathLike | None = None,
    trainable_backbone_layers: int | None = None, norm_layer: Any = None, **options: Any,
) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn``. ``options``: see :data:`OPTIONS`."""
    return _build("fasterrcnn_resnet50_fpn", "resnet50", fpn=True, num_classes=num_classes, returned_stages=(1, 2, 3, 4),
                  backbone_weights=backbone_weights, trainable_backbone_layers=trainable_backbone_layers,
                  norm_layer=norm_layer, fpn_channels=256, options=options)


@register_model(FASTER_RCNN, task="detection", default_input=(3, 800, 800),
                notes="Any registered classifier as backbone (backbone='resnet18'), fpn=True/False, anchor_sizes, "
                      "aspect_ratios, roi_output_size, backbone_weights (a cnnlab run folder or a file).")
def faster_rcnn(
    *, backbone: str = "resnet18", fpn: bool = True, num_classes: int = 91, returned_stages: Sequence[int] | None = None,
    backbone_weights: str | os.PathLike | None = None, trainable_backbone_layers: int | None = None,
    norm_layer: Any = None, fpn_channels: int = 256, **options: Any,
) -> FasterRCNN:
    """Faster R-CNN on any registered classifier. ``options``: torchvision's names, see :data:`OPTIONS`."""
    return _build("faster_rcnn", backbone, fpn=fpn, num_classes=num_classes, returned_stages=returned_stages,
                  backbone_weights=backbone_weights, trainable_backbone_layers=trainable_backbone_layers,
                  norm_layer=norm_layer, fpn_channels=fpn_channels, options=options)
