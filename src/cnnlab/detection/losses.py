"""Losses of dense (one-stage) detectors: the focal loss and the per-anchor losses built on it.

The focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", §3) is the binary cross-entropy
scaled by ``(1 - p_t) ** gamma``: an anchor the model already classifies well (``p_t`` near 1; the tens of
thousands of easy background anchors of a one-stage detector) contributes almost nothing, so the few hard
examples and the positives drive training instead of being drowned out. With ``alpha`` it is also weighted
per class of the target (``alpha`` for positives, ``1 - alpha`` for negatives).

- :func:`sigmoid_focal_loss` / :class:`FocalLoss`: the loss on logits, elementwise with a reduction; the same
  values and gradients as ``torchvision.ops.sigmoid_focal_loss`` (the oracle in the tests).
- :func:`focal_classification_loss`: RetinaNet's classification loss from matched anchors: one-hot targets,
  anchors between the IoU thresholds ignored, summed and divided by the number of positive anchors.
- :func:`l1_box_loss`: the box regression loss on the positive anchors, over the same normaliser.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import BoxCoder, Matcher

__all__ = ["REDUCTIONS", "sigmoid_focal_loss", "FocalLoss", "check_focal_parameters",
           "focal_classification_loss", "l1_box_loss"]

REDUCTIONS = ("none", "mean", "sum")


def check_focal_parameters(alpha: float | None, gamma: float) -> None:
    """A CnnlabError for ``alpha`` > 1 (None or a negative value: no weighting) or a negative ``gamma``."""
    if alpha is not None and not isinstance(alpha, (int, float)):
        raise CnnlabError(f"focal loss alpha must be a number in [0, 1] (or None / -1: no class weighting), "
                          f"got {alpha!r}")
    if alpha is not None and alpha > 1:
        raise CnnlabError(f"focal loss alpha is the weight of the positives, in [0, 1] (the paper's 0.25), got {alpha}")
    if not isinstance(gamma, (int, float)) or gamma < 0:
        raise CnnlabError(f"focal loss gamma must be a number >= 0 (0 gives the cross-entropy; the paper's 2), "
                          f"got {gamma!r}")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """The focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) of logits ``inputs`` against ``targets`` in [0, 1].

    Written out here, rather than calling ``torchvision.ops.sigmoid_focal_loss`` (which computes the same
    and is the reference in the tests), so that the paper's terms read as the paper writes them and bad
    arguments get a CnnlabError. ``log(p_t)`` comes from ``binary_cross_entropy_with_logits`` (stable for
    large logits), as in torchvision; soft targets work too.

    Args:
        inputs: logits of any shape.
        targets: the same shape, 1 for the positive class and 0 for the negative (or a soft value).
        alpha: weight of the positives (``1 - alpha`` for the negatives); None or a negative value: none.
        gamma: the focusing exponent; 0 gives the (alpha-weighted) binary cross-entropy.
        reduction: ``"none"`` (elementwise), ``"mean"`` or ``"sum"``.
    """
    check_focal_parameters(alpha, gamma)
    if reduction not in REDUCTIONS:
        raise CnnlabError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if inputs.shape != targets.shape:
        raise CnnlabError(f"focal loss inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have "
                          "the same shape (one logit per target)")
    p = torch.sigmoid(inputs)
    cross_entropy = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # -log(p_t)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = cross_entropy * ((1 - p_t) ** gamma)  # the modulating factor: ~0 for easy examples (p_t -> 1)
    if alpha is not None and alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class FocalLoss(nn.Module):
    """:func:`sigmoid_focal_loss` as a module.

    Args:
        alpha: weight of the positives (paper: 0.25); None: no class weighting.
        gamma: the focusing exponent (paper: 2).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        check_focal_parameters(alpha, gamma)
        if reduction not in REDUCTIONS:
            raise CnnlabError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


def _mean_over_images(per_image: list[Tensor]) -> Tensor:
    # summed left to right and divided, as torchvision's detection losses (the same float result)
    total = per_image[0]
    for value in per_image[1:]:
        total = total + value
    return total / max(1, len(per_image))


def focal_classification_loss(cls_logits: Tensor, labels: Sequence[Tensor], matched_idxs: Sequence[Tensor], *,
                              alpha: float | None = 0.25, gamma: float = 2.0) -> Tensor:
    """RetinaNet's classification loss (Lin et al. 2017, §4): focal loss over all anchors / positive anchors.

    Per image the target of an anchor matched to a box is that box's class one-hot; every other anchor is a
    negative for every class (an image without boxes: all of them), except those between the IoU thresholds
    (``Matcher.BETWEEN_THRESHOLDS``), which are left out. The sum is divided by the number of positive anchors
    (at least 1), then averaged over the images.

    Args:
        cls_logits: (B, N, C) logits per anchor and class (C counts the background channel, as torchvision).
        labels: per image, the (G,) int64 labels of its boxes.
        matched_idxs: per image, the (N,) box index of each anchor from :class:`~cnnlab.detection.boxes.Matcher`.
    """
    losses = []
    for logits, labels_i, matched in zip(cls_logits, labels, matched_idxs):
        foreground = matched >= 0
        num_foreground = foreground.sum()
        target = torch.zeros_like(logits)
        target[foreground, labels_i[matched[foreground]]] = 1.0
        valid = matched != Matcher.BETWEEN_THRESHOLDS
        loss = sigmoid_focal_loss(logits[valid], target[valid], alpha=alpha, gamma=gamma, reduction="sum")
        losses.append(loss / max(1, num_foreground))
    return _mean_over_images(losses)


def l1_box_loss(box_regression: Tensor, anchors: Sequence[Tensor], boxes: Sequence[Tensor],
                matched_idxs: Sequence[Tensor], box_coder: BoxCoder) -> Tensor:
    """RetinaNet's box loss, as torchvision's: L1 between the predicted and the target deltas of the positive
    anchors, summed and divided by their number (at least 1), then averaged over the images; 0 without boxes.

    Args:
        box_regression: (B, N, 4) predicted deltas per anchor.
        anchors: per image, the (N, 4) anchors.
        boxes: per image, the (G, 4) ground-truth boxes.
        matched_idxs: per image, the (N,) matched box index of each anchor (< 0: not a positive).
        box_coder: encodes the matched boxes against the anchors.
    """
    losses = []
    for deltas, anchors_i, boxes_i, matched in zip(box_regression, anchors, boxes, matched_idxs):
        foreground = torch.where(matched >= 0)[0]
        target = box_coder.encode(boxes_i[matched[foreground]], anchors_i[foreground])
        losses.append(F.l1_loss(deltas[foreground], target, reduction="sum") / max(1, foreground.numel()))
    return _mean_over_images(losses)
