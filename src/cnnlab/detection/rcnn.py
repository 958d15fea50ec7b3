"""R-CNN (Girshick et al. 2014, "Rich feature hierarchies for accurate object detection and semantic segmentation").

Per image: about 2,000 selective-search proposals; each is cropped with 16 pixels of context (of 227), warped
to the CNN's input size and passed through the whole classifier CNN, one forward pass per region (the cost the
later papers remove); the CNN's last hidden vector feeds linear class scores and a class-specific box regressor.

What cnnlab does differently from the paper, and why (docs/detection_classic.md):

- one stage of training instead of three (fine-tune with softmax, then per-class SVMs on cached fc7 features
  with hard negative mining, then ridge box regressors): the scores, the box regressor and the CNN are
  trained together, the scores with softmax cross-entropy (``head={"cls_loss": "softmax"}``, the default: Fast
  R-CNN §5.4 found it as good as SVMs once everything is fine-tuned) or with a multi-class hinge loss
  (``"hinge"``: the SVMs' objective on the same linear scores);
- the box regressor is trained on the sampled positives (IoU >= 0.5) with smooth L1, as Fast R-CNN, where the
  paper used ridge regression on proposals of IoU >= 0.6.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from cnnlab._errors import CnnlabError
from cnnlab.detection._region_models import (
    ImageAsFeatures,
    ProposalDetector,
    RegionCNN,
    RegionHeadConfig,
    RegionHeads,
    WarpRegions,
    check_num_classes,
    make_transform,
)
from cnnlab.detection.proposals import ProposalConfig, RegionProposer
from cnnlab.detection.roi_heads import FastRCNNPredictor
from cnnlab.models.registry import Family, register_model

__all__ = ["RCNN_FAMILY", "rcnn", "build_region_cnn"]

RCNN_FAMILY = Family(
    name="R-CNN",
    paper="Girshick, Donahue, Darrell, Malik: Rich feature hierarchies for accurate object detection and "
          "semantic segmentation (CVPR 2014)",
    year=2014,
    url="https://arxiv.org/abs/1311.2524",
)


def build_region_cnn(name: str, *, weights: str | os.PathLike | None = None, in_channels: int = 3):
    """The classifier ``name`` with its final layer removed, optionally with a run's or a file's weights."""
    from cnnlab.detection.backbone import load_backbone_weights
    from cnnlab.models.registry import create_model, model_info

    info = model_info(name)
    if info.task != "classification":
        raise CnnlabError(f"backbone={name!r} is a {info.task} model; R-CNN's region CNN must be a registered "
                          "classifier (cnnlab.list_models(task='classification'))")
    cnn = create_model(name, in_channels=in_channels)
    if weights is not None:
        load_backbone_weights(cnn, weights)
    cnn.reset_classifier(0)  # forward now returns the pre-logit vector (AlexNet's fc7 in the paper)
    return cnn


@register_model(RCNN_FAMILY, task="detection", default_input=(3, 600, 600),
                notes="Regions cropped, warped and classified one CNN pass each; any classifier as the region CNN.")
def rcnn(
    *,
    backbone: str = "resnet18",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | None = None,
    proposals: ProposalConfig | str | dict | None = "selective_search_fast",
    roi_output_size: int | Sequence[int] | None = None,
    context_padding: float = 16 / 227,
    region_batch_size: int = 128,
    head: RegionHeadConfig | dict | None = None,
    min_size: int | Sequence[int] = 600,
    max_size: int = 1000,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    in_channels: int = 3,
) -> ProposalDetector:
    """R-CNN with any registered classifier as the region CNN.

    Args:
        backbone: the classifier run on every region (the paper: AlexNet).
        num_classes: K + 1 (the background counts).
        backbone_weights: a cnnlab classification run folder or a weights file for that classifier.
        proposals: a ProposalConfig, a method name (``"selective_search_fast"``, ``"selective_search_quality"``,
            ``"grid"``) or a dict of ProposalConfig fields.
        roi_output_size: the warped region's size (int or (h, w)); None: the classifier's default input size
            (224 for ImageNet networks; the paper's AlexNet took 227).
        context_padding: share of the warped size given to context on each side (the paper: 16 of 227).
        region_batch_size: regions per CNN forward pass.
        head: RegionHeadConfig fields (sampling, ``cls_loss="softmax" | "hinge"``, NMS); R-CNN's mini-batch is
            128 regions per training step over the whole batch (``regions_per_batch``), 25 % foreground.
        min_size, max_size, image_mean, image_std: the DetectionTransform's (images are resized before cropping).
        in_channels: image channels.
    """
    from cnnlab.models.registry import model_info

    check_num_classes(num_classes)
    cnn = build_region_cnn(backbone, weights=backbone_weights, in_channels=in_channels)
    if roi_output_size is None:
        roi_output_size = model_info(backbone).default_input[1:]
    size = (roi_output_size, roi_output_size) if isinstance(roi_output_size, int) else tuple(roi_output_size)
    if len(size) != 2 or min(size) < getattr(cnn, "min_input_size", 1):
        raise CnnlabError(f"roi_output_size={roi_output_size!r}: expected an int or (h, w) of at least "
                          f"{getattr(cnn, 'min_input_size', 1)}, the smallest input {backbone} takes")
    config = RegionHeadConfig.of(head, batch_size_per_image=128, positive_fraction=0.25, regions_per_batch=128)
    region_cnn = RegionCNN(cnn, region_batch_size)
    heads = RegionHeads(WarpRegions(size, context_padding), region_cnn,
                        FastRCNNPredictor(region_cnn.out_features, num_classes), config)
    transform = make_transform(min_size, max_size, image_mean, image_std, in_channels, size_divisible=1)
    return ProposalDetector(RegionProposer(proposals), transform, ImageAsFeatures(), heads, num_classes)
