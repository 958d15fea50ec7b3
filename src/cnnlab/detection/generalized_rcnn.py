"""The two-stage detector as a composition of named parts (Ren et al. 2015, Figure 2).

transform (normalise, resize, batch) -> backbone (feature maps) -> RPN (proposals) -> RoI heads
(classes and boxes) -> postprocess (boxes back to each input's size). Each part is a module that can
be swapped or tested alone. Fast R-CNN, SPP-net and R-CNN use ``_region_models.ProposalDetector`` instead: their
proposals come from the input image itself (selective search sees the real pixels, before the transform).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cnnlab.detection.options import check_inputs

__all__ = ["GeneralizedRCNN"]


class GeneralizedRCNN(nn.Module):
    """``model(images, targets)``: a dict of named losses in training, one dict of detections per image in eval.

    Args:
        transform: a :class:`~cnnlab.detection.transform.DetectionTransform`.
        backbone: images (B, C, H, W) -> ``OrderedDict`` of feature maps.
        rpn: (batch, features, targets) -> (proposals per image, losses); any proposal stage works.
        roi_heads: (features, proposals, image sizes, targets) -> (detections, losses).
        num_classes: classes including the background, to check the targets' labels.
    """

    def __init__(self, transform: nn.Module, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        original_sizes = check_inputs(images, targets, self.training, self.num_classes)

        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)
