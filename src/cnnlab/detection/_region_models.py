"""The parts R-CNN, SPP-net and Fast R-CNN share: external proposals, a region head, the composed detector.

The three papers differ in one place, how a proposal becomes a feature vector:

- R-CNN (Girshick et al. 2014): crop the region from the image, warp it to the CNN's input size, and run the
  whole classifier CNN on it, once per region (:class:`WarpRegions` + :class:`RegionCNN`);
- SPP-net (He et al. 2014): run the convolutions once per image, max-pool each region's window of the feature
  map into a spatial pyramid (:class:`cnnlab.layers.spp.SPPRoIPool`), then fully connected layers;
- Fast R-CNN (Girshick 2015): the same single conv pass, a one-level 7 x 7 RoI pooling (:class:`RoIPool`).

Everything else is one composition (:class:`ProposalDetector`, read like torchvision's ``GeneralizedRCNN``):
proposals from the input image, normalise/resize/batch, features, RoI heads (sampling, losses, per-class NMS:
``cnnlab.detection.roi_heads.RoIHeads``), boxes mapped back to the input sizes.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from cnnlab._errors import CnnlabError
from cnnlab.detection.options import check_inputs
from cnnlab.detection.proposals import ProposalConfig, RegionProposer
from cnnlab.detection.roi_heads import RoIHeads, fastrcnn_loss
from cnnlab.detection.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, resize_boxes

CLS_LOSSES = ("softmax", "hinge")


@dataclass(frozen=True)
class RegionHeadConfig:
    """How the region head samples, learns and keeps detections.

    Args:
        fg_iou_thresh: a proposal with IoU >= this with a box is that box's class (0.5 in all three papers).
        bg_iou_thresh: below this, background (0.5: R-CNN's fine-tuning and Fast R-CNN's upper bound).
        batch_size_per_image, positive_fraction: regions sampled per image and their largest foreground share
            (Fast R-CNN: 64 per image, 25 %).
        regions_per_batch: if set, the regions sampled per training step over the whole batch, shared equally by
            its images (at most ``batch_size_per_image`` each, at least 1). R-CNN's mini-batch is 128 regions per
            SGD step, 32 foreground (Girshick et al. 2014, section 2.3), and each region is a whole CNN pass: per
            image, a batch of 8 would keep 1,024 CNN passes' activations for the backward pass (23 GB for a
            ResNet-18 at 224 px).
        cls_loss: ``"softmax"`` (cross-entropy over K+1 classes, Fast R-CNN's) or ``"hinge"`` (a multi-class hinge,
            ``F.multi_margin_loss``: the linear scores trained as the SVMs of R-CNN and SPP-net, jointly).
        bbox_reg_weights: the box coder's (wx, wy, ww, wh).
        score_thresh, nms_thresh, detections_per_img: inference (the papers' NMS threshold is 0.3).
    """

    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    regions_per_batch: int | None = None
    cls_loss: str = "softmax"
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.cls_loss not in CLS_LOSSES:
            raise CnnlabError(f"cls_loss must be one of {', '.join(CLS_LOSSES)}, got {self.cls_loss!r}")
        if self.regions_per_batch is not None and not (isinstance(self.regions_per_batch, int)
                                                       and self.regions_per_batch >= 1):
            raise CnnlabError(f"regions_per_batch must be a positive int or None, got {self.regions_per_batch!r}")

    @classmethod
    def of(cls, value: RegionHeadConfig | dict | None, **defaults) -> RegionHeadConfig:
        """A config from a dict of fields (over the model's ``defaults``), a config, or None."""
        if isinstance(value, RegionHeadConfig):
            return value
        if value is not None and not isinstance(value, dict):
            raise CnnlabError(f"head must be a dict of RegionHeadConfig fields or a RegionHeadConfig, "
                              f"got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(value or {}) - names
        if unknown:
            raise CnnlabError(f"unknown head options {sorted(unknown)}; expected some of {sorted(names)}")
        merged = {**defaults, **(value or {})}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


class RegionHeads(RoIHeads):
    """``RoIHeads`` whose classification loss may be a multi-class hinge instead of softmax cross-entropy.

    With ``cls_loss="hinge"`` the K+1 linear scores are trained with ``F.multi_margin_loss`` (margin 1): the
    score of the right class must beat every other by 1, as the one-SVM-per-class stage of R-CNN asks, but
    jointly with the features and the box regressor instead of on cached features. Detections are still
    ranked by the softmax of those scores, which keeps ``score_thresh`` meaningful.
    """

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 config: RegionHeadConfig) -> None:
        kwargs = {k: v for k, v in asdict(config).items() if k not in ("cls_loss", "regions_per_batch")}
        super().__init__(box_roi_pool, box_head, box_predictor, **kwargs)
        self.cls_loss, self.regions_per_batch = config.cls_loss, config.regions_per_batch
        self.per_image = config.batch_size_per_image

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training and self.regions_per_batch is not None:  # the sampler reads its size at each call
            share = max(1, self.regions_per_batch // max(1, len(proposals)))
            self.fg_bg_sampler.batch_size_per_image = min(self.per_image, share)
        if not self.training or self.cls_loss == "softmax":
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise CnnlabError("the region head in training mode needs targets (dicts with 'boxes' and 'labels')")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        loss_classifier = F.multi_margin_loss(class_logits, torch.cat(labels), margin=1.0)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


# -- R-CNN's region features: crop, warp, the whole CNN per region ------------------------------------------------
class ImageAsFeatures(nn.Module):
    """R-CNN's "backbone": the normalised image batch itself, under the name ``"image"`` (the crops come from it)."""

    out_channels = 3

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(image=x)


class WarpRegions(nn.Module):
    """Crop every region from the image with context padding and warp it to ``output_size`` (R-CNN §2.1).

    The region is first dilated so that, once warped, ``context_padding`` of the output's size on each side is
    image context around the original box (the paper: 16 pixels of 227); whatever falls outside the image is
    zero, which after normalisation is the mean image value, as the paper's mean padding. The warp is
    anisotropic (the box's aspect ratio is not kept) and bilinear (``torchvision.ops.roi_align``, aligned).

    Args:
        output_size: the warped (height, width), the CNN's input size.
        context_padding: the share of the warped size given to context on each side.
    """

    def __init__(self, output_size: tuple[int, int], context_padding: float = 16 / 227) -> None:
        super().__init__()
        if not 0 <= context_padding < 0.5:
            raise CnnlabError(f"context_padding is a share of the warped size per side, in [0, 0.5), got {context_padding}")
        self.output_size = tuple(output_size)
        self.context_padding = context_padding

    def dilate(self, boxes: Tensor) -> Tensor:
        """Grow each (x1, y1, x2, y2) box about its centre so the original fills ``1 - 2 p`` of the warp."""
        factor = 1.0 / (1.0 - 2.0 * self.context_padding)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        half = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
        return torch.cat((centre - half, centre + half), dim=1)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        image = features["image"]
        boxes = [self.dilate(p) for p in proposals]
        # (R, C, h, w): one warped crop per region; sampling_ratio 2 averages 2 x 2 points per output pixel
        return roi_align(image, boxes, self.output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, context_padding={self.context_padding:.4f}"


class RegionCNN(nn.Module):
    """R-CNN's box head: the whole classifier CNN on every warped region, ``region_batch_size`` regions at a time.

    The classifier's final layer is removed (``reset_classifier(0)``), so each region gives the vector the
    classifier's last layer would see (AlexNet's fc7 in the paper).

    Args:
        cnn: a cnnlab classifier with ``num_classes = 0``.
        region_batch_size: regions per forward pass of the CNN (memory vs. speed).
    """

    def __init__(self, cnn: nn.Module, region_batch_size: int = 128) -> None:
        super().__init__()
        if region_batch_size < 1:
            raise CnnlabError(f"region_batch_size must be >= 1, got {region_batch_size}")
        self.cnn = cnn
        self.region_batch_size = region_batch_size
        self.out_features = int(cnn.num_features)

    def forward(self, crops: Tensor) -> Tensor:
        if crops.shape[0] == 0:
            return crops.new_zeros((0, self.out_features))
        # (R, C, h, w) -> (R, D), one CNN pass per chunk of regions
        return torch.cat([self.cnn(chunk) for chunk in crops.split(self.region_batch_size)], dim=0)


# -- Fast R-CNN's pooling ---------------------------------------------------------------------------------------
def infer_scale(feature: Tensor, image_shapes: Sequence[tuple[int, int]]) -> float:
    """The map's cells per input pixel, a power of 2 (as ``MultiScaleRoIAlign`` infers it)."""
    largest = max(shape[0] for shape in image_shapes)
    return 2.0 ** round(math.log2(feature.shape[-2] / largest))


class RoIPool(nn.Module):
    """Fast R-CNN's RoI pooling of one feature map, with ``MultiScaleRoIAlign``'s call signature.

    Args:
        output_size: the pooled grid (7 x 7 for VGG-16 in the paper).
        featmap_name: the feature map pooled.
        mode: ``"pool"`` (the paper's max pooling over quantised bins, ``torchvision.ops.roi_pool``) or ``"align"``
            (bilinear RoIAlign, He et al. 2017, ``torchvision.ops.roi_align`` with ``aligned=False`` as torchvision's
            Faster R-CNN).
        sampling_ratio: RoIAlign's sampling points per bin side.
    """

    def __init__(self, output_size: int | tuple[int, int] = 7, featmap_name: str = "0", mode: str = "pool",
                 sampling_ratio: int = 2) -> None:
        super().__init__()
        if mode not in ("pool", "align"):
            raise CnnlabError(f"roi_pool must be 'pool' (RoIPool, the paper) or 'align' (RoIAlign), got {mode!r}")
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.featmap_name = featmap_name
        self.mode = mode
        self.sampling_ratio = sampling_ratio

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        x = features[self.featmap_name]
        scale = infer_scale(x, image_shapes)
        if self.mode == "pool":
            return roi_pool(x.float(), proposals, self.output_size, scale)  # no bf16 kernel on the CPU
        return roi_align(x, proposals, self.output_size, scale, self.sampling_ratio, aligned=False)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, featmap_name={self.featmap_name!r}, mode={self.mode!r}"


# -- the composition ---------------------------------------------------------------------------------------------
def make_transform(min_size: int | Sequence[int], max_size: int, image_mean: Sequence[float] | None,
                   image_std: Sequence[float] | None, in_channels: int = 3, size_divisible: int = 32) -> DetectionTransform:
    """The shared DetectionTransform; a non-RGB model gets the ImageNet statistics averaged over channels."""
    if in_channels != 3:
        image_mean = image_mean or [sum(IMAGENET_MEAN) / 3] * in_channels
        image_std = image_std or [sum(IMAGENET_STD) / 3] * in_channels
    return DetectionTransform(min_size, max_size, image_mean, image_std, size_divisible=size_divisible)


class ProposalDetector(nn.Module):
    """A detector fed by external region proposals: proposals, transform, features, region head, back to input sizes.

    ``forward(images, targets=None, proposals=None)``: torchvision's detection interface; ``proposals`` (one
    (N_i, 4) tensor per image, in the input image's pixels) skips the proposal stage, e.g. to time it apart.

    Args:
        proposer: the proposal stage (its cache lives as long as the model).
        transform: normalise, resize, batch (``DetectionTransform``).
        backbone: batch -> ``OrderedDict`` of feature maps (R-CNN: the image itself).
        roi_heads: the region head (``RegionHeads``).
        num_classes: classes including the background.
    """

    def __init__(self, proposer: RegionProposer, transform: DetectionTransform, backbone: nn.Module,
                 roi_heads: RoIHeads, num_classes: int) -> None:
        super().__init__()
        self.proposer = proposer
        self.transform = transform
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.num_classes = num_classes

    @torch.no_grad()
    def propose(self, images: Sequence[Tensor]) -> list[Tensor]:
        """Each image's proposals in its own pixels (cached by the proposer)."""
        return [self.proposer(image) for image in images]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                proposals: list[Tensor] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        original_sizes = check_inputs(images, targets, self.training, self.num_classes)
        if proposals is None:
            proposals = self.propose(images)
        elif len(proposals) != len(images):
            raise CnnlabError(f"got {len(images)} images but {len(proposals)} proposal tensors; give one per image")
        image_list, targets = self.transform(images, targets if self.training else None)
        proposals = [resize_boxes(p.to(image_list.tensors), size, new).detach()
                     for p, size, new in zip(proposals, original_sizes, image_list.image_sizes)]
        features = self.backbone(image_list.tensors)
        detections, losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise CnnlabError(f"num_classes counts the background too (K + 1, as torchvision): expected an int >= 2, "
                          f"got {num_classes!r}")


def conv_pass_detector(
    *,
    backbone: str,
    num_classes: int,
    backbone_weights: str | os.PathLike | None,
    returned_stages: int | Sequence[int] | None,
    fpn: bool = False,
    fpn_channels: int = 256,
    trainable_backbone_layers: int | None,
    norm_layer: str | Callable[..., nn.Module] | None,
    proposals: ProposalConfig | str | dict | None,
    pool_factory: Callable[[nn.Module], tuple[nn.Module, int]],
    representation_size: int,
    head: RegionHeadConfig,
    transform: DetectionTransform,
    in_channels: int,
) -> ProposalDetector:
    """SPP-net and Fast R-CNN: one conv pass per image, a pooling of each region, two FC layers, the predictor.

    ``pool_factory(backbone)`` returns the region pooling module (features, proposals, image sizes -> (R, ...))
    and the length of its flattened output per region.
    """
    from cnnlab.detection.backbone import build_backbone
    from cnnlab.detection.roi_heads import FastRCNNPredictor, TwoMLPHead

    check_num_classes(num_classes)
    stages = [returned_stages] if isinstance(returned_stages, int) else returned_stages
    stages = None if stages is None else list(stages)
    body = build_backbone(backbone, fpn=fpn, returned_stages=stages,
                          weights=backbone_weights, trainable_layers=trainable_backbone_layers, norm_layer=norm_layer,
                          fpn_channels=fpn_channels, in_channels=in_channels)
    if body.out_channels is None:  # several stages of different widths, no FPN to even them out
        raise CnnlabError(f"without an FPN the RoI head pools one map: return one stage (returned_stages=N) or use "
                          f"fpn=True; got stages with {body.channels} channels")
    box_roi_pool, pooled = pool_factory(body)
    heads = RegionHeads(box_roi_pool, TwoMLPHead(pooled, representation_size),
                        FastRCNNPredictor(representation_size, num_classes), head)
    return ProposalDetector(RegionProposer(proposals), transform, body, heads, num_classes)
