"""Fast R-CNN (Girshick 2015, "Fast R-CNN").

One conv pass per image; each selective-search proposal is RoI-pooled (max pooling over a 7 x 7 grid of its
window, a one-level spatial pyramid) from the shared feature map, passed through two fully connected layers,
then to a softmax over K + 1 classes and K + 1 class-specific box regressors; the whole network, convolutions
included, is trained end to end with the multi-task loss (cross-entropy + smooth L1). The paper samples 64
RoIs per image, 25 % of them foreground. What remains slow is the proposal stage: of the paper's 2.3 s per
image, 2 s are selective search (Faster R-CNN's RPN removes it).

The region head is the shared ``RoIHeads`` (Faster R-CNN's), fed by external proposals instead of an RPN.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from torchvision.ops import MultiScaleRoIAlign

from cnnlab._errors import CnnlabError
from cnnlab.detection._region_models import (
    ProposalDetector,
    RegionHeadConfig,
    RoIPool,
    conv_pass_detector,
    make_transform,
)
from cnnlab.detection.proposals import ProposalConfig
from cnnlab.models.registry import Family, register_model

__all__ = ["FAST_RCNN_FAMILY", "fast_rcnn"]

FAST_RCNN_FAMILY = Family(
    name="Fast R-CNN",
    paper="Girshick: Fast R-CNN (ICCV 2015)",
    year=2015,
    url="https://arxiv.org/abs/1504.08083",
)


@register_model(FAST_RCNN_FAMILY, task="detection", default_input=(3, 600, 600),
                notes="External proposals, RoI pooling on one shared conv map, softmax + smooth L1 end to end.")
def fast_rcnn(
    *,
    backbone: str = "resnet18",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | None = None,
    proposals: ProposalConfig | str | dict | None = "selective_search_fast",
    roi_output_size: int | Sequence[int] = 7,
    roi_pool: str | None = None,
    representation_size: int = 1024,
    fpn: bool = False,
    fpn_channels: int = 256,
    returned_stages: int | Sequence[int] | None = None,
    trainable_backbone_layers: int | None = None,
    norm_layer: str | None = None,
    head: RegionHeadConfig | dict | None = None,
    min_size: int | Sequence[int] = 600,
    max_size: int = 1000,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    in_channels: int = 3,
) -> ProposalDetector:
    """Fast R-CNN with any registered classifier's conv stages as the backbone.

    Args:
        backbone: the classifier whose stages give the feature map (the paper: VGG-16's conv5_3, stride 16).
        num_classes: K + 1 (the background counts).
        backbone_weights: a cnnlab classification run folder or a weights file for that classifier.
        proposals: a ProposalConfig, a method name or a dict of its fields.
        roi_output_size: the pooled grid, int or (h, w) (7 in the paper).
        roi_pool: ``"pool"`` (RoI max pooling, the paper) or ``"align"`` (RoIAlign); None: ``"pool"`` on one map,
            ``"align"`` with an FPN (the only one ``MultiScaleRoIAlign`` offers).
        representation_size: width of fc6 and fc7 (4096 in the paper's VGG-16).
        fpn: pool from a feature pyramid (Lin et al. 2017; each RoI from the level its size maps to, through
            ``torchvision.ops.MultiScaleRoIAlign``) instead of one map; not in the paper.
        fpn_channels: channels of every pyramid level.
        returned_stages: index (or, with ``fpn``, indices) into the classifier's ``feature_info`` of the maps
            pooled; None: the deepest of stride <= 16 (``fpn``: every stage of stride >= 4).
        trainable_backbone_layers: stages fine-tuned (``build_backbone``'s).
        norm_layer: the backbone's norm (``build_backbone``'s).
        head: RegionHeadConfig fields (64 RoIs per image, 25 % foreground, softmax by default).
        min_size, max_size, image_mean, image_std: the DetectionTransform's (the paper: shorter side 600, longer
            at most 1000).
        in_channels: image channels.
    """
    size = (roi_output_size, roi_output_size) if isinstance(roi_output_size, int) else tuple(roi_output_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise CnnlabError(f"fast_rcnn roi_output_size must be an int or (h, w) of positive ints, got {roi_output_size!r}")

    mode = roi_pool if roi_pool is not None else ("align" if fpn else "pool")
    if fpn and mode != "align":
        raise CnnlabError("fast_rcnn with fpn=True pools with RoIAlign (MultiScaleRoIAlign); "
                          f"got roi_pool={roi_pool!r}: drop it or set roi_pool='align'")

    def pool_factory(body):
        pooled = body.out_channels * size[0] * size[1]
        if fpn:  # every pyramid level but the extra max-pooled one, as torchvision's Faster R-CNN
            return MultiScaleRoIAlign([n for n in body.names if n != "pool"], size, sampling_ratio=2), pooled
        return RoIPool(size, featmap_name="0", mode=mode), pooled

    return conv_pass_detector(
        backbone=backbone, num_classes=num_classes, backbone_weights=backbone_weights,
        returned_stages=returned_stages,
        fpn=fpn, fpn_channels=fpn_channels, trainable_backbone_layers=trainable_backbone_layers, norm_layer=norm_layer,
        proposals=proposals, pool_factory=pool_factory,
        representation_size=representation_size,
        head=RegionHeadConfig.of(head, batch_size_per_image=64, positive_fraction=0.25),
        transform=make_transform(min_size, max_size, image_mean, image_std, in_channels), in_channels=in_channels,
    )
