"""segmentation_models_pytorch (smp) layouts of ``Unet`` and ``PSPNet`` -> cnnlab's, and the encoder they share.

smp's ResNet encoders are torchvision ResNets (``encoder.conv1``, ``encoder.bn1``, ``encoder.layer1.0...``):
they go through cnnlab's ResNet converter. smp's ``Conv2dReLU`` is ``Sequential(conv, norm, relu)``
(``.0.``/``.1.``), cnnlab's ``ConvNormAct`` names them (``.conv.``/``.norm.``). Every converter raises
KeyError on a key it does not know, so ``cnnlab.load_weights`` tells the layouts apart.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.models.registry import StateDict

__all__ = ["encoder_with_depth", "unet_from_smp", "pspnet_from_smp", "drop_unused_encoder_keys"]

ENCODER = "encoder."


# -- the encoder ------------------------------------------------------------------------------------------------
def encoder_with_depth(name: str, *, depth: int | None, output_stride: int = 32, weights: Any = None,
                       in_channels: int = 3, norm_layer: Any = None, model: str = "model") -> nn.Module:
    """The first ``depth`` ``feature_info`` stages of classifier ``name`` (all when None) through
    :func:`cnnlab.segmentation.encoder.build_encoder`: smp's ``encoder_depth`` (5 for a ResNet: the stem at
    stride 2, layer1..layer4 at 4..32). ``model`` names the caller in errors."""
    from cnnlab.models.registry import model_info
    from cnnlab.segmentation.encoder import build_encoder, stage_table

    info = model_info(name)
    if info.task != "classification":  # before stage_table builds it with options a non-classifier may refuse
        raise CnnlabError(f"{model}: backbone={name!r} is a {info.task} model; the encoder must be a registered "
                          "classifier (cnnlab.list_models(task='classification'))")
    feature_info = stage_table(name, output_stride=output_stride, in_channels=in_channels) \
        if output_stride in (8, 16, 32) else []
    if depth is None:
        depth = len(feature_info)
    if feature_info and (not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= len(feature_info)):
        raise CnnlabError(f"{model}: encoder_depth={depth!r}, but backbone={name!r} has {len(feature_info)} stages "
                          f"({', '.join(f'{f.module} (stride {f.stride})' for f in feature_info)}); give a depth in "
                          f"1..{len(feature_info)} or a backbone with more stages")
    return build_encoder(name, output_stride=output_stride, stages=list(range(depth)) if feature_info else None,
                         weights=weights, in_channels=in_channels, norm_layer=norm_layer)


# -- converters -------------------------------------------------------------------------------------------------
def _conv_relu(key: str) -> str:
    """smp ``Conv2dReLU`` children -> ConvNormAct's: ``X.0.weight`` -> ``X.conv.weight``, ``X.1.*`` -> ``X.norm.*``."""
    return re.sub(r"\.0\.(weight|bias)$", r".conv.\1", re.sub(r"\.1\.(weight|bias|running_mean|running_var|"
                                                           r"num_batches_tracked)$", r".norm.\1", key))


def _convert(state_dict: StateDict, rules: Sequence[tuple[str, Callable[[re.Match], str]]], model: str) -> StateDict:
    from cnnlab.segmentation.encoder import encoder_from_smp

    out = encoder_from_smp(state_dict)
    for key, value in state_dict.items():
        if key.startswith(ENCODER):
            continue
        for pattern, rename in rules:
            if m := re.match(pattern, key):
                out[rename(m)] = value
                break
        else:
            raise KeyError(f"{key} is not a key of smp's {model}")
    return out


def unet_from_smp(state_dict: StateDict) -> StateDict:
    """smp ``Unet`` (ResNet encoder) state_dict -> cnnlab's ``unet(backbone=...)`` layout."""
    return _convert(state_dict, (
        (r"^decoder\.blocks\.(\d+)\.(conv[12])\.([01]\..+)$",
         lambda m: _conv_relu(f"decoder.blocks.{m[1]}.{m[2]}.{m[3]}")),
        (r"^decoder\.center\.([01])\.([01]\..+)$",
         lambda m: _conv_relu(f"decoder.center.conv{int(m[1]) + 1}.{m[2]}")),
        (r"^segmentation_head\.0\.(weight|bias)$", lambda m: f"head.{m[1]}"),
    ), "Unet")


def pspnet_from_smp(state_dict: StateDict) -> StateDict:
    """smp ``PSPNet`` (ResNet encoder) state_dict -> cnnlab's ``pspnet(backbone=...)`` layout."""
    return _convert(state_dict, (
        (r"^decoder\.psp\.blocks\.(\d+)\.pool\.1\.([01]\..+)$",
         lambda m: _conv_relu(f"decoder.psp.branches.{m[1]}.proj.{m[2]}")),
        (r"^decoder\.conv\.([01]\..+)$", lambda m: _conv_relu(f"decoder.bottleneck.{m[1]}")),
        (r"^segmentation_head\.0\.(weight|bias)$", lambda m: f"head.{m[1]}"),
    ), "PSPNet")


def drop_unused_encoder_keys(model: nn.Module, state_dict: StateDict) -> StateDict:
    """Drop the encoder keys of stages the model does not run (smp keeps ``layer3``/``layer4`` at depth 3;
    cnnlab's encoder drops what it never runs), so that the rest loads strictly."""
    own = model.state_dict()
    return {k: v for k, v in state_dict.items() if k in own or not k.startswith(ENCODER)}
