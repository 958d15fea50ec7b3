"""Box coding, matching and balanced sampling: the bookkeeping every two-stage detector shares.

- :class:`BoxCoder`: boxes <-> regression targets ``(dx, dy, dw, dh)`` relative to a reference box
  (Girshick et al. 2014, appendix C; the same parameterisation in Fast and Faster R-CNN), each
  scaled by a weight (Faster R-CNN's RoI head uses ``(10, 10, 5, 5)``, the RPN ``(1, 1, 1, 1)``).
- :class:`Matcher`: each anchor/proposal to the ground-truth box it overlaps most, or to
  "background" / "ignore" by two IoU thresholds (Ren et al. 2015, §3.1.2).
- :class:`BalancedSampler`: a fixed-size mini-batch per image with at most a given fraction of
  positives (256 anchors with up to 1:1 in the RPN, 512 RoIs with 25 % in Fast R-CNN).
- :func:`check_targets`: the training targets, validated with errors that name the image and field.

The semantics follow torchvision's ``models.detection._utils`` so that its checkpoints and tests
carry over; IoUs come from ``torchvision.ops.box_iou``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cnnlab._errors import CnnlabError

__all__ = ["BoxCoder", "Matcher", "BalancedSampler", "batched_nms", "check_targets"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms``, with one path that ``torch.export`` can trace.

    torchvision picks, by the number of boxes, either one NMS over boxes shifted apart per class (the
    "coordinate trick") or one NMS per class; both keep the same boxes in the same order of decreasing score.
    After a score threshold the number of boxes depends on the data, and torch.export refuses to branch on
    it, so while exporting the coordinate trick is always used (a single ``torchvision::nms``, which ONNX has
    as ``NonMaxSuppression``). In normal use this is torchvision's function, unchanged.
    """
    import torchvision.ops

    if not torch.compiler.is_exporting():
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    # torchvision's _batched_nms_coordinate_trick, less its `if boxes.numel() == 0` (a branch on the data, too):
    # a zero appended to the coordinates gives max() a value when there are no boxes, and the same maximum
    # otherwise (boxes are clipped to the image, so their coordinates are >= 0)
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


class BoxCoder:
    """Encode boxes as offsets ``(dx, dy, dw, dh)`` from reference boxes, and decode them back.

    Args:
        weights: multipliers of ``(dx, dy, dw, dh)``; larger weights make the targets larger, which
            balances the regression loss against the classification loss.
        bbox_xform_clip: upper bound of ``dw, dh`` before ``exp`` when decoding (log(1000/16): no box
            grows more than 1000/16 times its reference), so a wild prediction cannot overflow.
    """

    def __init__(
        self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise CnnlabError(f"BoxCoder weights must be four positive numbers (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Regression targets that move each of ``proposals`` onto its row of ``reference_boxes``.

        Args:
            reference_boxes: (N, 4) the boxes to reach (the matched ground truth), x1, y1, x2, y2.
            proposals: (N, 4) the boxes they are expressed against (anchors or proposals).
        Returns:
            (N, 4) ``(wx * dx, wy * dy, ww * dw, wh * dh)``.
        """
        wx, wy, ww, wh = self.weights
        widths = proposals[:, 2] - proposals[:, 0]
        heights = proposals[:, 3] - proposals[:, 1]
        ctr_x = proposals[:, 0] + 0.5 * widths
        ctr_y = proposals[:, 1] + 0.5 * heights

        gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights

        # R-CNN appendix C: centre shifts in units of the reference size, log size ratios
        dx = wx * (gt_ctr_x - ctr_x) / widths
        dy = wy * (gt_ctr_y - ctr_y) / heights
        dw = ww * torch.log(gt_widths / widths)
        dh = wh * torch.log(gt_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Apply offsets to reference boxes.

        Args:
            rel_codes: (N, 4 * k) offsets, k sets per box (one per class in the RoI head).
            boxes: (N, 4) reference boxes.
        Returns:
            (N, k, 4) decoded boxes, x1, y1, x2, y2.
        """
        boxes = boxes.to(rel_codes.dtype)
        n = boxes.shape[0]
        if not (torch.compiler.is_exporting() and rel_codes.ndim == 2):  # (n, 4 k) already while exporting:
            # `if n` would branch on a count that depends on the data (the boxes above a score threshold)
            rel_codes = rel_codes.reshape(n, -1) if n else rel_codes.reshape(0, max(rel_codes.shape[-1], 4))
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx  # (N, k)
        dy = rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * torch.exp(dw) * widths[:, None]
        half_h = 0.5 * torch.exp(dh) * heights[:, None]
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)


class Matcher:
    """Assign each prediction (anchor, proposal) the ground-truth box it overlaps most.

    IoU >= ``high_threshold``: that box's index; below ``low_threshold``: ``BELOW_LOW_THRESHOLD``
    (background); in between: ``BETWEEN_THRESHOLDS`` (ignored in the loss).

    Args:
        high_threshold, low_threshold: the IoU bounds (RPN: 0.7 and 0.3; Fast R-CNN: 0.5 and 0.5).
        allow_low_quality_matches: also match, to each ground-truth box, the predictions that overlap it
            most even under ``high_threshold`` (ties included), so that every box gets a positive
            (Ren et al. 2015, §3.1.2, condition (i)).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise CnnlabError(f"Matcher: low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """(G, N) IoU of G ground-truth boxes with N predictions -> (N,) int64 matched index or -1 / -2."""
        num_gt, num_pred = iou.shape
        if num_gt == 0:  # an image without boxes: everything is background
            return torch.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        if num_pred == 0:
            return torch.empty((0,), dtype=torch.int64, device=iou.device)
        matched_vals, matches = iou.max(dim=0)
        best = matches.clone() if self.allow_low_quality_matches else None
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        matches[(matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)] = self.BETWEEN_THRESHOLDS
        if best is not None:
            # every prediction that is some box's best match (ties too) gets back its best box
            highest_per_gt = iou.max(dim=1).values
            _, pred_idx = torch.where(iou == highest_per_gt[:, None])
            matches[pred_idx] = best[pred_idx]
        return matches


class BalancedSampler:
    """Sample up to ``batch_size_per_image`` elements per image, at most ``positive_fraction`` positives.

    Labels > 0 are positives, 0 negatives, -1 ignored. When there are too few positives, negatives fill
    the batch. The draw consumes the RNG as torchvision's ``BalancedPositiveNegativeSampler`` does (one
    ``torch.randperm`` over the positives, then one over the negatives, per image), so that with the same
    seed both libraries pick the same elements.

    Args:
        batch_size_per_image: elements sampled per image (RPN 256, RoI head 512).
        positive_fraction: the largest share of positives in that batch (RPN 0.5, RoI head 0.25).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image < 1:
            raise CnnlabError(f"batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise CnnlabError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(
        self, labels: Sequence[Tensor], generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image, a uint8 mask of the sampled positives and one of the sampled negatives.

        Args:
            labels: one (N_i,) tensor per image: > 0 positive, 0 negative, -1 ignored.
            generator: the RNG of the draw; None uses torch's global RNG (as torchvision).
        """
        pos_masks, neg_masks = [], []
        for labels_i in labels:
            positive = torch.where(labels_i >= 1)[0]
            negative = torch.where(labels_i == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # randperm runs on the CPU when a CPU generator is given (a CUDA tensor then gets CPU indices)
            device = positive.device if generator is None else generator.device
            pos_perm = torch.randperm(positive.numel(), device=device, generator=generator)[:num_pos]
            neg_perm = torch.randperm(negative.numel(), device=device, generator=generator)[:num_neg]
            pos_pick = positive[pos_perm.to(positive.device)]
            neg_pick = negative[neg_perm.to(negative.device)]
            pos_mask = torch.zeros_like(labels_i, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels_i, dtype=torch.uint8)
            pos_mask[pos_pick] = 1
            neg_mask[neg_pick] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def check_targets(targets: Sequence[dict], num_images: int, num_classes: int | None = None) -> None:
    """Raise a CnnlabError naming the image and the field for a target a detector cannot train on.

    Expected per image: ``boxes`` a float tensor (N, 4) of finite x1, y1, x2, y2 with x2 > x1 and y2 > y1,
    and ``labels`` an int64 tensor (N,) in 1..num_classes-1 (0 is the background).
    """
    if not isinstance(targets, (list, tuple)):
        raise CnnlabError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != num_images:
        raise CnnlabError(f"got {num_images} images but {len(targets)} targets; give one target dict per image")
    for i, t in enumerate(targets):
        where = f"targets[{i}]"
        if not isinstance(t, dict):
            raise CnnlabError(f"{where} must be a dict with 'boxes' and 'labels', got {type(t).__name__}")
        for key in ("boxes", "labels"):
            if key not in t:
                raise CnnlabError(f"{where} has no {key!r} (it has {sorted(t)}); expected 'boxes' (N, 4) and 'labels' (N,)")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
            kind = boxes.dtype if isinstance(boxes, Tensor) else type(boxes).__name__
            raise CnnlabError(f"{where}['boxes'] must be a float tensor (N, 4), got {kind}")
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise CnnlabError(f"{where}['boxes'] must have shape (N, 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise CnnlabError(f"{where}['labels'] must be an int64 tensor (N,), got {kind}")
        if labels.shape != boxes.shape[:1]:
            raise CnnlabError(f"{where}['labels'] has shape {tuple(labels.shape)} but there are "
                              f"{boxes.shape[0]} boxes; expected ({boxes.shape[0]},)")
        if not torch.isfinite(boxes).all():
            raise CnnlabError(f"{where}['boxes'] holds NaN or infinite values")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            j = int(torch.where(bad)[0][0])
            raise CnnlabError(f"{where}['boxes'][{j}] = {boxes[j].tolist()} has no positive width and height; "
                              "expected x1 < x2 and y1 < y2 (x1, y1, x2, y2 order)")
        if labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 1 or (num_classes is not None and high >= num_classes):
                top = f"{num_classes - 1}" if num_classes is not None else "K"
                raise CnnlabError(f"{where}['labels'] holds {low if low < 1 else high}; expected 1..{top} "
                                  f"(0 is the background, num_classes={num_classes} counts it)")
