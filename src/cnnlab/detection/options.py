"""Flat torchvision-style detector options grouped into one small config per part, and the interface's input check.

A builder takes torchvision's flat names (``min_size``, ``rpn_pre_nms_top_n_test``, ``score_thresh``, ...) so a user
moves between the two without relearning; inside, each part (transform, anchors, head, post-processing) gets its
own dataclass. :func:`group_options` does that split for every detector, with one error for an unknown name.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from torch import Tensor

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.detection.boxes import check_targets

__all__ = ["check_inputs", "group_options"]


def group_options(model: str, options: Mapping[str, Any], parts: Mapping[str, Any],
                  names: Mapping[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """``options`` spread over ``parts`` (part name -> a config dataclass instance, replaced, not changed).

    Args:
        model: the detector's name, for the error message.
        names: flat option name -> (part, field); None: every field of every part under its own name.
    """
    if names is None:
        names = {f.name: (part, f.name) for part, config in parts.items() for f in fields(config)}
    changes: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in options.items():
        if key not in names:
            raise CnnlabError(f"{model} does not take the option {key!r}{did_you_mean(key, names)} "
                              f"(its options: {', '.join(sorted(names))})")
        part, field = names[key]
        if isinstance(value, list):  # from JSON / the command line
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        changes[part][field] = value
    return {part: replace(config, **changes[part]) for part, config in parts.items()}


def check_inputs(images: Any, targets: Any, training: bool, num_classes: int | None) -> list[tuple[int, int]]:
    """The detection interface's inputs checked (a list of images; in training, valid targets for each); the
    images' (H, W), to map the detections back to."""
    if not isinstance(images, (list, tuple)) or not images:
        raise CnnlabError(f"a detector takes a non-empty list of (C, H, W) images in 0..1, got {type(images).__name__}")
    if training:
        if targets is None:
            raise CnnlabError("in training mode the detector needs targets: one dict with 'boxes' (N, 4) "
                              "and 'labels' (N,) per image (call model.eval() to detect)")
        check_targets(targets, len(images), num_classes)
    return [(int(im.shape[-2]), int(im.shape[-1])) for im in images if isinstance(im, Tensor)]
