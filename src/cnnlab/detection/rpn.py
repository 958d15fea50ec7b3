"""The region proposal network (Ren et al. 2015, §3.1): objectness and box deltas for every anchor.

A 3x3 conv slides over each feature map; two sibling 1x1 convs give, per position, one objectness
logit and four box deltas per anchor. Proposals are the anchors moved by their deltas; per feature
map the ``pre_nms_top_n`` most object-like are kept, clipped to the image, tiny ones and those under
``score_thresh`` dropped, NMS run per level, and the ``post_nms_top_n`` best returned. Training
labels an anchor positive at IoU >= 0.7 with a box (or when it is a box's best anchor), negative
below 0.3, samples 256 per image with up to half positives, and adds a binary cross-entropy and a
smooth L1 loss.

Parameter names (``head.conv``, ``head.cls_logits``, ``head.bbox_pred``) follow torchvision's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image, remove_small_boxes

from cnnlab._errors import CnnlabError
from cnnlab.detection.anchors import AnchorGenerator
from cnnlab.detection.boxes import BalancedSampler, BoxCoder, Matcher, batched_nms
from cnnlab.detection.roi_heads import SMOOTH_L1_BETA
from cnnlab.detection.transform import ImageList
from cnnlab.layers import ConvNormAct

__all__ = ["RPNHead", "RegionProposalNetwork"]


class RPNHead(nn.Module):
    """The RPN's small network, shared by every feature map: a 3x3 conv + ReLU, then 1x1 convs.

    Args:
        in_channels: channels of the feature maps (all maps must have the same).
        num_anchors: anchors per position (sizes x ratios of a level).
        conv_depth: number of 3x3 conv + ReLU layers before the two 1x1 convs.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(*[
            ConvNormAct(in_channels, in_channels, 3, norm_layer=None) for _ in range(conv_depth)
        ])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):  # the paper's N(0, 0.01) init, zero biases
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per map: objectness (B, A, H, W) and deltas (B, 4A, H, W)."""
        objectness, deltas = [], []
        for x in features:
            t = self.conv(x)
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas


def _flatten_levels(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-map (B, A*C, H, W) outputs -> (B * sum(H W A), 1) logits and (B * sum(H W A), 4) deltas.

    The anchor order is position-major, then anchor, matching :class:`AnchorGenerator`.
    """
    flat_obj, flat_deltas = [], []
    for obj, dlt in zip(objectness, deltas):
        n, a, h, w = obj.shape
        flat_obj.append(obj.view(n, a, 1, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 1))
        flat_deltas.append(dlt.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_obj, dim=1).flatten(0, -2), torch.cat(flat_deltas, dim=1).reshape(-1, 4)


class RegionProposalNetwork(nn.Module):
    """Propose object boxes from anchors; in training also return the RPN's two losses.

    Args:
        anchor_generator: the anchors (one size set per feature map).
        head: features -> objectness logits and deltas (:class:`RPNHead`).
        fg_iou_thresh, bg_iou_thresh: anchor labelling IoUs (0.7 positive, < 0.3 negative).
        batch_size_per_image, positive_fraction: the anchor mini-batch (256, half positives at most).
        pre_nms_top_n_train, pre_nms_top_n_test: proposals kept per feature map before NMS.
        post_nms_top_n_train, post_nms_top_n_test: proposals kept per image after NMS.
        nms_thresh: the IoU of the NMS among proposals.
        score_thresh: proposals with a lower objectness probability are dropped.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n_train, self.pre_nms_top_n_test = pre_nms_top_n_train, pre_nms_top_n_test
        self.post_nms_top_n_train, self.post_nms_top_n_test = post_nms_top_n_train, post_nms_top_n_test
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3  # proposals narrower than this (in pixels) are dropped
        self.generator: torch.Generator | None = None  # None: torch's global RNG, as torchvision

    def pre_nms_top_n(self) -> int:
        return self.pre_nms_top_n_train if self.training else self.pre_nms_top_n_test

    def post_nms_top_n(self) -> int:
        return self.post_nms_top_n_train if self.training else self.post_nms_top_n_test

    # -- training targets --------------------------------------------------------------------------------
    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: anchor labels (1 object, 0 background, -1 ignored; float) and each anchor's matched box."""
        labels, matched_boxes = [], []
        for anchors_i, target in zip(anchors, targets):
            gt = target["boxes"]
            if gt.numel() == 0:  # no boxes: every anchor is background
                labels.append(torch.zeros(anchors_i.shape[0], dtype=torch.float32, device=anchors_i.device))
                matched_boxes.append(torch.zeros_like(anchors_i, dtype=torch.float32))
                continue
            match = self.proposal_matcher(box_iou(gt, anchors_i))
            matched_boxes.append(gt[match.clamp(min=0)])
            lab = (match >= 0).to(torch.float32)
            lab[match == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
        return labels, matched_boxes

    def compute_loss(
        self, objectness: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Binary cross-entropy over the sampled anchors; smooth L1 on the positives, over the sample size."""
        pos_masks, neg_masks = self.fg_bg_sampler(labels, generator=self.generator)
        pos = torch.where(torch.cat(pos_masks))[0]
        neg = torch.where(torch.cat(neg_masks))[0]
        sampled = torch.cat([pos, neg])
        labels_all = torch.cat(labels)
        loss_box = F.smooth_l1_loss(deltas[pos], regression_targets[pos], beta=SMOOTH_L1_BETA,
                                    reduction="sum") / max(sampled.numel(), 1)
        loss_objectness = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled])
        return loss_objectness, loss_box

    # -- proposals ------------------------------------------------------------------------------------------
    def filter_proposals(
        self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]], anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(B, N, 4) decoded anchors and their logits -> per image, the kept proposals and their scores."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(anchors_per_level)]).reshape(1, -1).expand_as(objectness)
        # the top-n of each level separately, so that the fine levels' many anchors do not crowd out the rest
        top_idx, offset = [], 0
        for obj in objectness.split(anchors_per_level, 1):
            k = min(self.pre_nms_top_n(), obj.shape[1])
            top_idx.append(obj.topk(k, dim=1).indices + offset)
            offset += obj.shape[1]
        top_idx = torch.cat(top_idx, dim=1)
        batch = torch.arange(num_images, device=proposals.device)[:, None]
        objectness, levels, proposals = objectness[batch, top_idx], levels[batch, top_idx], proposals[batch, top_idx]
        probs = torch.sigmoid(objectness)

        boxes_out, scores_out = [], []
        for boxes, scores, lvl, size in zip(proposals, probs, levels, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]  # NMS per level
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (in batch pixels) and, in training, ``loss_objectness``, ``loss_rpn_box_reg``."""
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_images = len(anchors)
        anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = _flatten_levels(objectness, deltas)
        # proposals do not back-propagate into the deltas (the approximate joint training of §3.2)
        proposals = self.box_coder.decode(deltas.detach(), torch.cat(anchors)).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, anchors_per_level)

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise CnnlabError("the RPN in training mode needs targets (a list of dicts with 'boxes')")
            labels, matched_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(torch.cat(matched_boxes), torch.cat(anchors))
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, losses
