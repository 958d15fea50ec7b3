"""The RoI heads of Fast/Faster R-CNN: pool each proposal, classify it, refine its box.

Girshick 2015 (Fast R-CNN): every region of interest is pooled from the shared feature map to a
fixed grid (RoI pooling; RoIAlign here by default, through ``torchvision.ops.MultiScaleRoIAlign``),
passed through two fully connected layers, then to a softmax over K+1 classes and K+1 class-specific
box regressors. Training samples 512 RoIs per image, 25 % foreground (IoU >= 0.5 with a box), and
adds the ground-truth boxes to the proposals; the loss is cross-entropy plus smooth L1 on the
positives' boxes. Inference decodes one box per class, drops low scores, runs NMS per class.

Module and parameter names (``box_head.fc6``, ``box_predictor.cls_score`` ...) are torchvision's, so
its checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image, remove_small_boxes, roi_pool

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import BalancedSampler, BoxCoder, Matcher, batched_nms

__all__ = ["RoIHeads", "RoIPool", "TwoMLPHead", "FastRCNNPredictor", "fastrcnn_loss"]

# smooth L1's beta in both Faster R-CNN losses (torchvision's and Detectron's value: nearly L1)
SMOOTH_L1_BETA = 1 / 9


class RoIPool(nn.Module):
    """Fast R-CNN's RoI max pooling (``torchvision.ops.roi_pool``) on one feature map.

    Called as ``MultiScaleRoIAlign`` is, ``(features, proposals, image_shapes)``, so the two swap; the
    map's scale is inferred the same way (the nearest power of two of map size / padded image size).

    Args:
        featmap_name: the key of the feature map in the backbone's output.
        output_size: the pooled grid (7 in Fast R-CNN with VGG-16).
    """

    def __init__(self, featmap_name: str, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x = features[self.featmap_name]
        height = max(s[0] for s in image_shapes)
        scale = 2.0 ** round(math.log2(x.shape[-2] / height))
        # float32: torchvision's CPU roi_pool has no bf16 kernel (under autocast x is bf16, the boxes float32)
        return roi_pool(x.float(), proposals, self.output_size, spatial_scale=scale)  # (R, C, h, w)


def _roi_align_while_exporting(pool: nn.Module, features: dict[str, Tensor], proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> Tensor:
    """``MultiScaleRoIAlign.forward`` as torch.export can trace it: the same per-level ``roi_align``.

    torchvision sizes its result with ``len(rois)``, a Python int, which a data-dependent number of proposals
    cannot give while tracing; here the result is sized by ``rois.shape[0]`` (a symbolic size) instead.
    """
    from torchvision.ops import roi_align
    from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

    maps = _filter_input(features, pool.featmap_names)
    if pool.scales is None or pool.map_levels is None:
        pool.scales, pool.map_levels = _setup_scales(maps, image_shapes, pool.canonical_scale, pool.canonical_level)
    rois = _convert_to_roi_format(proposals)
    if len(maps) == 1:
        return roi_align(maps[0], rois, pool.output_size, pool.scales[0], pool.sampling_ratio)
    levels = pool.map_levels(proposals)
    result = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *pool.output_size))
    for level, (feature, scale) in enumerate(zip(maps, pool.scales)):
        idx = torch.where(levels == level)[0]
        result[idx] = roi_align(feature, rois[idx], pool.output_size, scale, pool.sampling_ratio).to(result.dtype)
    return result


class TwoMLPHead(nn.Module):
    """The two fully connected layers between RoI pooling and the predictor (Fast R-CNN's fc6, fc7).

    Args:
        in_channels: the pooled feature's size, channels * pool height * pool width.
        representation_size: the width of both layers (1024 in torchvision's FPN models, 4096 in VGG-16).
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # (R, C, h, w) -> (R, C * h * w)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNPredictor(nn.Module):
    """Class scores and per-class box offsets of each RoI.

    Args:
        in_channels: the box head's output width.
        num_classes: classes including the background (K + 1).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)  # (R, K+1), (R, 4 (K+1))


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's multi-task loss: cross-entropy over all sampled RoIs, smooth L1 on the positives.

    The box loss sums over the positives' true-class offsets and divides by the number of sampled
    RoIs (not of positives), as torchvision; an image set without positives gives a box loss of 0.

    Args:
        class_logits: (R, K+1); box_regression: (R, 4 (K+1)).
        labels: per image, the sampled RoIs' classes (0 = background).
        regression_targets: per image, (R_i, 4) encoded targets.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    loss_classifier = F.cross_entropy(class_logits, labels_all)

    positive = torch.where(labels_all > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)  # (R, K+1, 4)
    loss_box_reg = F.smooth_l1_loss(
        box_regression[positive, labels_all[positive]], targets_all[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / max(labels_all.numel(), 1)
    return loss_classifier, loss_box_reg


class RoIHeads(nn.Module):
    """Sample RoIs (training), pool them, run the box head and predictor; losses or detections.

    Args:
        box_roi_pool: features + proposals + image sizes -> (R, C, h, w) (``MultiScaleRoIAlign``).
        box_head: (R, C, h, w) -> (R, D) (``TwoMLPHead``).
        box_predictor: (R, D) -> class logits (R, K+1) and offsets (R, 4 (K+1)) (``FastRCNNPredictor``).
        fg_iou_thresh, bg_iou_thresh: a proposal with IoU >= fg is foreground, < bg background.
        batch_size_per_image, positive_fraction: the RoI mini-batch (512, 25 %).
        bbox_reg_weights: the box coder's weights; None means (10, 10, 5, 5).
        score_thresh: detections scoring at most this are dropped at inference.
        nms_thresh: per-class NMS IoU threshold at inference.
        detections_per_img: the most detections returned per image.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights if bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        # None: the global RNG (as torchvision, which is what the oracle tests rely on); a Generator
        # makes the RoI sampling reproducible without touching the global seed
        self.generator: torch.Generator | None = None

    # -- training: which RoIs, and what they should predict ---------------------------------------------
    def assign_targets(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image, each proposal's matched box index (clamped to >= 0) and its label (0 bg, -1 ignored)."""
        matched, labels = [], []
        for props, boxes, classes in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:  # an image without boxes: every proposal is background
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                lab = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
            else:
                match = self.proposal_matcher(box_iou(boxes, props))
                idx = match.clamp(min=0)
                lab = classes[idx].to(torch.int64)
                lab[match == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[match == Matcher.BETWEEN_THRESHOLDS] = -1
            matched.append(idx)
            labels.append(lab)
        return matched, labels

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Add the ground truth to the proposals, match, sample; the sampled RoIs, matches, labels, targets."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        # the ground-truth boxes are proposals too (Fast R-CNN), so every box has a perfect positive
        proposals = [torch.cat((p, b)) for p, b in zip(proposals, gt_boxes)]
        matched, labels = self.assign_targets(proposals, gt_boxes, gt_labels)
        pos_masks, neg_masks = self.fg_bg_sampler(labels, generator=self.generator)

        sampled_props, sampled_matched, sampled_labels, matched_boxes = [], [], [], []
        for i, (pos, neg) in enumerate(zip(pos_masks, neg_masks)):
            keep = torch.where(pos | neg)[0]
            sampled_props.append(proposals[i][keep])
            sampled_labels.append(labels[i][keep])
            sampled_matched.append(matched[i][keep])
            boxes = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_boxes.append(boxes[sampled_matched[-1]])
        targets_enc = self.box_coder.encode(torch.cat(matched_boxes), torch.cat(sampled_props))
        regression_targets = list(targets_enc.split([len(p) for p in sampled_props], 0))
        return sampled_props, sampled_matched, sampled_labels, regression_targets

    # -- inference ------------------------------------------------------------------------------------------
    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: boxes, scores and labels after the score threshold, per-class NMS and the top-k cut."""
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, torch.cat(proposals))  # (R, K+1, 4)
        pred_scores = F.softmax(class_logits, -1)
        counts = [p.shape[0] for p in proposals]  # not len(): a symbolic size while exporting

        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(counts), pred_scores.split(counts), image_shapes):
            boxes = clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            # one candidate per (RoI, foreground class); column 0 is the background
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Losses ``loss_classifier``, ``loss_box_reg`` in training; one dict of detections per image in eval."""
        if self.training:
            if targets is None:
                raise CnnlabError("RoIHeads in training mode needs targets (a list of dicts with 'boxes' and 'labels')")
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)

        if torch.compiler.is_exporting() and isinstance(self.box_roi_pool, MultiScaleRoIAlign):
            pooled = _roi_align_while_exporting(self.box_roi_pool, features, proposals, image_shapes)
        else:
            pooled = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(pooled)
        class_logits, box_regression = self.box_predictor(box_features)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)], {}
