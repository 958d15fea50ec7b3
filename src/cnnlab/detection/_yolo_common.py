"""What YOLOv1 and YOLOv3 share: the input transform, option splitting, stage lookup and post-processing."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from cnnlab._errors import CnnlabError
from cnnlab.detection.boxes import batched_nms
from cnnlab.detection.options import check_inputs, group_options
from cnnlab.detection.transform import DetectionTransform

__all__ = ["TransformConfig", "PostprocessConfig", "split_options", "stage_indices", "make_transform",
           "select_detections", "BackboneOptions",
           "backbone_stages", "channel_stats", "check_inputs", "check_positive", "check_postprocess"]


@dataclass(frozen=True)
class TransformConfig:
    """Every image resized to one ``size`` x ``size`` square (the YOLO papers' fixed input), then normalised."""

    size: int = 448
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class PostprocessConfig:
    """Detections kept: class-specific score above ``score_thresh``, the ``topk_candidates`` best (cell or
    anchor, class) pairs per image, class-wise NMS at ``nms_thresh``, then the ``detections_per_img`` best
    (torchvision's option names)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    topk_candidates: int = 1000


@dataclass(frozen=True)
class BackboneOptions:
    """How the classifier becomes the backbone (see :func:`cnnlab.detection.backbone.build_backbone`)."""

    backbone_weights: str | os.PathLike | None = None
    trainable_backbone_layers: int | None = None
    norm_layer: Any = None


def split_options(model: str, options: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """Flat option names -> the part configs they belong to (each field name is unique across ``parts``)."""
    return group_options(model, options, parts)


def check_positive(model: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CnnlabError(f"{model}: {name} must be a positive number, got {value!r}")


def backbone_stages(backbone: str, in_channels: int = 3) -> list:
    """``backbone``'s ``feature_info`` rows, read from the classifier built on the meta device (no memory, no init)."""
    from cnnlab.models.registry import create_model, model_info

    task = model_info(backbone).task
    if task != "classification":
        raise CnnlabError(f"backbone={backbone!r} is a {task} model; a backbone must be a registered classifier "
                          "(cnnlab.list_models(task='classification'))")
    with torch.device("meta"):
        info = list(getattr(create_model(backbone, in_channels=in_channels), "feature_info", []))
    if not info:
        raise CnnlabError(f"backbone={backbone!r} lists no feature_info stages, so detection cannot tap it")
    return info


def stage_indices(backbone: str, strides: Sequence[int], in_channels: int = 3) -> list[int]:
    """Indices into ``backbone``'s ``feature_info`` of the deepest stage at each of ``strides``."""
    info = backbone_stages(backbone, in_channels)
    found = []
    for stride in strides:
        at = [i for i, f in enumerate(info) if f.stride == stride]
        if not at:
            raise CnnlabError(f"backbone={backbone!r} has no stage at stride {stride} (its stages: "
                              f"{[f'{f.module} (stride {f.stride})' for f in info]}); this detector needs strides "
                              f"{list(strides)}")
        found.append(at[-1])
    return found


def channel_stats(transform: TransformConfig, in_channels: int) -> TransformConfig:
    """Images of other than 3 channels without a given mean and std: ImageNet's averaged over R, G, B."""
    if in_channels == 3 or transform.image_mean is not None or transform.image_std is not None:
        return transform
    return replace(transform, image_mean=(0.449,) * in_channels, image_std=(0.226,) * in_channels)


def make_transform(config: TransformConfig, divisor: int) -> DetectionTransform:
    if isinstance(config.size, bool) or not isinstance(config.size, int) or config.size < divisor \
            or config.size % divisor:
        raise CnnlabError(f"size={config.size!r}: the input side must be a positive multiple of {divisor} "
                          "(the backbone's largest stride)")
    return DetectionTransform(config.size, config.size, config.image_mean, config.image_std, size_divisible=1,
                              fixed_size=(config.size, config.size))


def check_postprocess(model: str, config: PostprocessConfig) -> None:
    if not 0.0 <= config.score_thresh <= 1.0 or not 0.0 <= config.nms_thresh <= 1.0:
        raise CnnlabError(f"{model}: score_thresh and nms_thresh must be in [0, 1], got {config.score_thresh!r} "
                          f"and {config.nms_thresh!r}")
    for name in ("detections_per_img", "topk_candidates"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CnnlabError(f"{model}: {name} must be a positive int, got {value!r}")


def select_detections(boxes: Tensor, scores: Tensor, image_size: tuple[int, int],
                      config: PostprocessConfig) -> dict[str, Tensor]:
    """One image's candidates -> its detections.

    Args:
        boxes: (M, 4) x1, y1, x2, y2 in the resized image's pixels.
        scores: (M, K) class-specific scores of the K foreground classes.
        image_size: (h, w) of the resized image (the boxes are clipped to it).
    Returns:
        ``boxes`` (D, 4), ``labels`` (D,) int64 in 1..K, ``scores`` (D,).
    """
    num_classes = scores.shape[1]
    flat = scores.flatten()  # (M * K,): candidate m, class c at m * K + c
    keep = torch.where(flat > config.score_thresh)[0]
    flat = flat[keep]
    if torch.compiler.is_exporting():  # no branch on a data-dependent count: top-k of at most all, the same set
        flat, top = flat.topk(min(config.topk_candidates, flat.shape[0]))
        keep = keep[top]
    elif len(flat) > config.topk_candidates:
        flat, top = flat.topk(config.topk_candidates)
        keep = keep[top]
    candidate, label = keep // num_classes, keep % num_classes
    chosen = clip_boxes_to_image(boxes[candidate], image_size)
    valid = remove_small_boxes(chosen, 1e-2)  # zero-area boxes after clipping (torchvision's min_size)
    chosen, flat, label = chosen[valid], flat[valid], label[valid]
    kept = batched_nms(chosen, flat, label, config.nms_thresh)[: config.detections_per_img]
    return {"boxes": chosen[kept], "labels": label[kept] + 1, "scores": flat[kept]}
