"""SSD's default boxes, its matching and MultiBox loss with hard negative mining, and its post-processing.

Liu et al. 2016, §2.2: at every cell of the m feature maps, default boxes of scale s_k (a share of the image
side) and aspect ratios a in {1, 2, 3, 1/2, 1/3} (width s_k sqrt(a), height s_k / sqrt(a)), plus one more box
of ratio 1 and scale sqrt(s_k s_(k+1)); s_k = s_min + (s_max - s_min)(k - 1)/(m - 1). A default box is
positive when its IoU with a ground-truth box is >= 0.5, and each ground-truth box also takes its best default
box; the loss is smooth L1 on the (Faster R-CNN) box offsets of the positives plus softmax cross-entropy on
the positives and the hardest negatives (at most 3 per positive), both divided by the number of positives.

The numerics follow torchvision's ``DefaultBoxGenerator``, ``SSDMatcher``, ``SSD.compute_loss`` and
``SSD.postprocess_detections`` step for step (``tests/detection/test_ssd.py`` compares the outputs). IoU, NMS
and clipping are ``torchvision.ops``; the default boxes are written here because torchvision has no function
for them outside its model classes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import BoxCoder, Matcher, batched_nms
from cnnlab.detection.transform import ImageList

__all__ = ["DefaultBoxGenerator", "paper_scales", "paper_aspect_ratios", "SSDMatcher", "MultiBoxLoss",
           "SSDPostprocess"]


def paper_scales(num_maps: int, min_scale: float = 0.2, max_scale: float = 0.9) -> tuple[float, ...]:
    """The paper's scales s_1..s_m evenly spaced from ``min_scale`` to ``max_scale`` (§2.2, Eq. 4), and 1.0 after
    them for the last map's extra box sqrt(s_m s_(m+1)) (torchvision's choice; the paper leaves s_(m+1) open)."""
    if num_maps == 1:
        return (min_scale, max_scale)
    step = (max_scale - min_scale) / (num_maps - 1.0)
    return tuple(min_scale + step * k for k in range(num_maps)) + (1.0,)


def paper_aspect_ratios(num_maps: int) -> tuple[tuple[float, ...], ...]:
    """SSD300's ratios beside 1 (each r also gives 1/r): {2} on the first and the last two maps, {2, 3} between."""
    return tuple((2.0,) if k == 0 or k >= num_maps - 2 else (2.0, 3.0) for k in range(num_maps))


class DefaultBoxGenerator(nn.Module):
    """SSD's default boxes for every cell of every feature map, in input-batch pixels (x1, y1, x2, y2).

    Args:
        aspect_ratios: per feature map, the ratios r beside 1; each gives two boxes (r and 1/r).
        scales: m + 1 scales (shares of the image side): s_1..s_m and the s_(m+1) of the last extra box.
        steps: per map, the cell size in pixels the centres are spaced by (SSD300's 8, 16, 32, 64, 100, 300);
            None: the image side over the map's cells.
        clip: clip the boxes' width and height to the image (1.0) before turning them into corners.
    """

    def __init__(self, aspect_ratios: Sequence[Sequence[float]], scales: Sequence[float],
                 steps: Sequence[int] | None = None, clip: bool = True) -> None:
        super().__init__()
        self.aspect_ratios = tuple(tuple(float(r) for r in ratios) for ratios in aspect_ratios)
        self.scales = tuple(float(s) for s in scales)
        self.steps = None if steps is None else tuple(steps)
        self.clip = clip
        num_maps = len(self.aspect_ratios)
        if len(self.scales) != num_maps + 1:
            raise CnnlabError(f"scales={list(self.scales)} has {len(self.scales)} values; {num_maps} feature maps need "
                              f"{num_maps + 1} (one per map and one more for the last map's extra box)")
        if self.steps is not None and len(self.steps) != num_maps:
            raise CnnlabError(f"steps={list(self.steps)} has {len(self.steps)} values but there are {num_maps} "
                              "feature maps; give one per map or steps=None")
        self.wh_pairs = [self._wh_pairs(k) for k in range(num_maps)]

    def _wh_pairs(self, k: int) -> Tensor:
        """(2 + 2 len(ratios), 2) widths and heights of map k's boxes, as shares of the image side."""
        s_k = self.scales[k]
        s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])  # the extra box of ratio 1 (§2.2)
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            pairs.extend([[s_k * root, s_k / root], [s_k / root, s_k * root]])
        return torch.as_tensor(pairs, dtype=torch.float32)

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]

    def relative_boxes(self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                       dtype: torch.dtype) -> Tensor:
        """(sum over maps of H W A, 4) boxes as (cx, cy, w, h) shares of the image: position-major, as the head."""
        boxes = []
        for k, (grid_h, grid_w) in enumerate(grid_sizes):
            if self.steps is not None:
                cells_x, cells_y = image_size[1] / self.steps[k], image_size[0] / self.steps[k]
            else:
                cells_y, cells_x = grid_h, grid_w
            shifts_x = ((torch.arange(0, grid_w) + 0.5) / cells_x).to(dtype=dtype)  # cell centres in 0..1
            shifts_y = ((torch.arange(0, grid_h) + 0.5) / cells_y).to(dtype=dtype)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            pairs = self.wh_pairs[k]
            centres = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)) * len(pairs), dim=-1).reshape(-1, 2)
            sizes = (pairs.clamp(min=0, max=1) if self.clip else pairs).repeat(grid_h * grid_w, 1)
            boxes.append(torch.cat((centres, sizes), dim=1))
        return torch.cat(boxes, dim=0)

    def forward(self, images: ImageList, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        """One (D, 4) tensor of default boxes per image, x1, y1, x2, y2 in the batch's pixels."""
        if len(feature_maps) != len(self.aspect_ratios):
            raise CnnlabError(f"aspect_ratios has {len(self.aspect_ratios)} entries but the backbone gives "
                              f"{len(feature_maps)} feature maps; give one tuple of ratios per map")
        image_size = (int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        boxes = self.relative_boxes(grid_sizes, image_size, dtype).to(device)
        x_y_size = torch.tensor([image_size[1], image_size[0]], device=device)
        corners = torch.cat([(boxes[:, :2] - 0.5 * boxes[:, 2:]) * x_y_size,
                             (boxes[:, :2] + 0.5 * boxes[:, 2:]) * x_y_size], -1)
        return [corners for _ in images.image_sizes]

    def extra_repr(self) -> str:
        return f"aspect_ratios={self.aspect_ratios}, scales={self.scales}, steps={self.steps}, clip={self.clip}"


class SSDMatcher(Matcher):
    """IoU >= ``threshold``: positive (its best box); below: background; and each box's best default box is
    forced to it, whatever their IoU (SSD §2.2, "matching strategy"; torchvision's ``SSDMatcher``).

    Args:
        threshold: the IoU of a positive (0.5 in the paper).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__(threshold, threshold, allow_low_quality_matches=False)

    def __call__(self, iou: Tensor) -> Tensor:
        matches = super().__call__(iou)
        if iou.shape[0] == 0 or iou.shape[1] == 0:
            return matches
        best_default_box = iou.max(dim=1).indices  # (G,) each ground-truth box's best default box
        matches[best_default_box] = torch.arange(best_default_box.numel(), dtype=torch.int64, device=iou.device)
        return matches


class MultiBoxLoss(nn.Module):
    """SSD's training loss: match, encode, smooth L1 on positives, cross-entropy on positives and hard negatives.

    Returns ``{"bbox_regression", "classification"}`` (torchvision's names), each summed over the batch and
    divided by the number of positives N (1 when there are none: an image without boxes adds 0 to both, and
    no negatives either, since it may mine 3 x 0 of them, as torchvision does).

    Args:
        box_coder: the offsets of the matched boxes (weights (10, 10, 5, 5), torchvision's).
        iou_thresh: the matcher's IoU threshold (0.5).
        positive_fraction: the share of positives among the classified boxes: 0.25 keeps 3 negatives per positive.
    """

    def __init__(self, box_coder: BoxCoder, iou_thresh: float = 0.5, positive_fraction: float = 0.25) -> None:
        super().__init__()
        self.box_coder = box_coder
        self.matcher = SSDMatcher(iou_thresh)
        self.neg_to_pos_ratio = (1.0 - positive_fraction) / positive_fraction
        # (temperature, weight) of a box teacher's soft targets (SSD.distill_from); None: the labels only
        self.distillation: tuple[float, float] | None = None

    def match(self, targets: Sequence[dict[str, Tensor]], default_boxes: Sequence[Tensor]) -> list[Tensor]:
        """Per image, (D,) the index of each default box's ground-truth box, or -1 (background)."""
        matched = []
        for boxes, targets_i in zip(default_boxes, targets):
            if targets_i["boxes"].numel() == 0:
                matched.append(torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device))
            else:
                matched.append(self.matcher(box_iou(targets_i["boxes"], boxes)))
        return matched

    def forward(self, targets: Sequence[dict[str, Tensor]], cls_logits: Tensor, bbox_regression: Tensor,
                default_boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """``cls_logits`` (B, D, K + 1) and ``bbox_regression`` (B, D, 4) of the head -> the two losses."""
        matched = self.match(targets, default_boxes)
        num_foreground = 0
        box_losses, class_targets, student, teacher = [], [], [], []
        for targets_i, regression_i, boxes_i, matched_i, logits_i in zip(targets, bbox_regression, default_boxes,
                                                                         matched, cls_logits):
            foreground = torch.where(matched_i >= 0)[0]
            foreground_gt = matched_i[foreground]
            num_foreground += foreground_gt.numel()
            target_regression = self.box_coder.encode(targets_i["boxes"][foreground_gt], boxes_i[foreground])
            box_losses.append(F.smooth_l1_loss(regression_i[foreground], target_regression, reduction="sum"))
            labels = torch.zeros(cls_logits.shape[1], dtype=targets_i["labels"].dtype, device=cls_logits.device)
            labels[foreground] = targets_i["labels"][foreground_gt]
            class_targets.append(labels)
            if self.distillation is not None and "teacher_logits" in targets_i:
                given = targets_i["teacher_logits"]
                if given.ndim != 2 or given.shape != (len(targets_i["boxes"]), logits_i.shape[-1] - 1):
                    raise CnnlabError(f"teacher_logits of shape {tuple(given.shape)} for {len(targets_i['boxes'])} "
                                      f"boxes; the detector has {logits_i.shape[-1] - 1} foreground classes: the "
                                      "teacher needs the same classes, one row per box")
                student.append(logits_i[foreground, 1:])  # the foreground classes: the teacher knows no background
                teacher.append(given[foreground_gt])
        labels = torch.stack(class_targets)  # (B, D), 0: background

        num_classes = cls_logits.shape[-1]
        cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), labels.reshape(-1),
                                   reduction="none").view(labels.shape)
        positive = labels > 0
        negative = self.hard_negatives(cls_loss, positive)
        n = max(1, num_foreground)
        losses = {"bbox_regression": torch.stack(box_losses).sum() / n,
                  "classification": (cls_loss[positive].sum() + cls_loss[negative].sum()) / n}
        if student:  # training with a box teacher (validation targets carry none: the same losses as without)
            losses["distillation"] = self.soft_targets(torch.cat(student), torch.cat(teacher), n)
        return losses

    def soft_targets(self, student: Tensor, teacher: Tensor, n: int) -> Tensor:
        """``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` summed over the positive default
        boxes and divided by ``n`` (the positives, as the other two losses): Hinton et al.'s soft term per box.
        ``student``: the positives' foreground logits (P, K); ``teacher``: their boxes' teacher logits (P, K)."""
        temperature, weight = self.distillation  # type: ignore[misc]
        log_student = F.log_softmax(student.float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
        return weight * temperature ** 2 * kl / n

    def hard_negatives(self, cls_loss: Tensor, positive: Tensor) -> Tensor:
        """(B, D) mask of each image's ``neg_to_pos_ratio`` x (its positives) highest-loss negatives (§2.2,
        "hard negative mining"), ranked by a sort as torchvision ranks them, so ties fall the same way."""
        num_negative = self.neg_to_pos_ratio * positive.sum(1, keepdim=True)
        negative_loss = cls_loss.clone()
        negative_loss[positive] = -float("inf")  # positives rank last
        _, order = negative_loss.sort(1, descending=True)
        rank = order.sort(1)[1]  # each box's place in that order
        return rank < num_negative


class SSDPostprocess(nn.Module):
    """Decode, clip, per class keep the ``topk_candidates`` best scores above ``score_thresh``, NMS per class,
    keep the ``detections_per_img`` best (torchvision's ``SSD.postprocess_detections``).

    Args:
        box_coder: decodes the head's offsets against the default boxes.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: torchvision's (0.01, 0.45, 200, 400).
    """

    def __init__(self, box_coder: BoxCoder, score_thresh: float = 0.01, nms_thresh: float = 0.45,
                 detections_per_img: int = 200, topk_candidates: int = 400) -> None:
        super().__init__()
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor, default_boxes: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        scores_all = F.softmax(cls_logits, dim=-1)
        num_classes = scores_all.shape[-1]
        detections = []
        for regression, scores, boxes_i, size in zip(bbox_regression, scores_all, default_boxes, image_sizes):
            boxes = clip_boxes_to_image(self.box_coder.decode(regression, boxes_i).reshape(-1, 4), size)
            found_boxes, found_scores, found_labels = [], [], []
            for label in range(1, num_classes):
                score = scores[:, label]
                keep = score > self.score_thresh
                score, box = score[keep], boxes[keep]
                score, top = score.topk(min(self.topk_candidates, score.numel()))
                found_boxes.append(box[top])
                found_scores.append(score)
                found_labels.append(torch.full_like(score, label, dtype=torch.int64))
            boxes, scores, labels = torch.cat(found_boxes), torch.cat(found_scores), torch.cat(found_labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    def extra_repr(self) -> str:
        return (f"score_thresh={self.score_thresh}, nms_thresh={self.nms_thresh}, "
                f"detections_per_img={self.detections_per_img}, topk_candidates={self.topk_candidates}")
