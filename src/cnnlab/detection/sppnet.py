"""SPP-net for detection (He, Zhang, Ren, Sun 2014, "Spatial Pyramid Pooling in Deep Convolutional Networks").

The convolutions run once per image; each selective-search window is projected onto the last conv map and
max-pooled into a spatial pyramid (the paper: 1x1, 2x2, 3x3, 6x6, 50 bins per channel), a fixed-length vector
whatever the window's size, which feeds two fully connected layers and the class scores and box offsets. That
removes R-CNN's one CNN pass per region: 24-102x faster at test time in the paper.

Differences from the paper (docs/detection_classic.md): scores are trained with softmax (or
``head={"cls_loss": "hinge"}``, the SVMs' objective) jointly with a smooth-L1 box regressor; the convolutions are
fine-tuned unless ``trainable_backbone_layers=0`` (the paper could fine-tune only the FC layers above the SPP
layer, the limitation Fast R-CNN removed); a single image scale (``min_size``) by default, a list of sizes for
multi-scale training.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from cnnlab._errors import CnnlabError
from cnnlab.detection._region_models import (
    ProposalDetector,
    RegionHeadConfig,
    conv_pass_detector,
    make_transform,
)
from cnnlab.detection.proposals import ProposalConfig
from cnnlab.layers.spp import DETECTION_LEVELS, SPPRoIPool, spp_output_size
from cnnlab.models.registry import Family, register_model

__all__ = ["SPPNET_FAMILY", "sppnet"]

SPPNET_FAMILY = Family(
    name="SPP-net",
    paper="He, Zhang, Ren, Sun: Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition "
          "(ECCV 2014)",
    year=2014,
    url="https://arxiv.org/abs/1406.4729",
)


@register_model(SPPNET_FAMILY, task="detection", default_input=(3, 600, 600),
                notes="One conv pass per image; each region max-pooled into a 1-2-3-6 spatial pyramid.")
def sppnet(
    *,
    backbone: str = "resnet18",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | None = None,
    proposals: ProposalConfig | str | dict | None = "selective_search_fast",
    roi_output_size: int | Sequence[int] = DETECTION_LEVELS,
    representation_size: int = 1024,
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
    """SPP-net with any registered classifier's conv stages as the backbone.

    Args:
        backbone: the classifier whose stages give the feature map (the paper: ZF-5).
        num_classes: K + 1 (the background counts).
        backbone_weights: a cnnlab classification run folder or a weights file for that classifier.
        proposals: a ProposalConfig, a method name or a dict of its fields.
        roi_output_size: the pyramid's levels (grid sizes); one int is a one-level pyramid, which is Fast R-CNN's
            RoI max pooling.
        representation_size: width of the two FC layers (fc6, fc7; 4096 in the paper).
        returned_stages: index into the classifier's ``feature_info`` of the map pooled; None: the deepest of
            stride <= 16.
        trainable_backbone_layers: stages fine-tuned (``build_backbone``'s); 0 freezes the convolutions, as the paper.
        norm_layer: the backbone's norm (``build_backbone``'s).
        head: RegionHeadConfig fields (128 regions per image, 25 % foreground by default).
        min_size, max_size, image_mean, image_std: the DetectionTransform's; a list of ``min_size`` values is
            multi-scale training.
        in_channels: image channels.
    """
    levels = (roi_output_size,) if isinstance(roi_output_size, int) else tuple(roi_output_size)
    if not levels or any(not isinstance(level, int) or level < 1 for level in levels):
        raise CnnlabError(f"sppnet roi_output_size is the pyramid's levels, e.g. (1, 2, 3, 6); got {roi_output_size!r}")

    def pool_factory(body):
        return SPPRoIPool(levels, featmap_name="0"), spp_output_size(body.out_channels, levels)

    return conv_pass_detector(
        backbone=backbone, num_classes=num_classes, backbone_weights=backbone_weights,
        returned_stages=returned_stages,
        trainable_backbone_layers=trainable_backbone_layers, norm_layer=norm_layer, proposals=proposals,
        pool_factory=pool_factory,
        representation_size=representation_size,
        head=RegionHeadConfig.of(head, batch_size_per_image=128, positive_fraction=0.25),
        transform=make_transform(min_size, max_size, image_mean, image_std, in_channels), in_channels=in_channels,
    )
