"""MnasNet (Tan et al. 2019): a mobile network found by platform-aware architecture search.

Two searched tables, both built from the shared MBConv block (``cnnlab.layers.mbconv``) with
ReLU and BN momentum 1 - 0.9997 (TF's decay 0.9997):

- MnasNet-A1, the paper's Fig. 7, with squeeze-excite in three stages: ``semnasnet_100`` and
  ``semnasnet_075`` (timm's names).
- MnasNet-B1, the variant without SE released with the authors' TF code, which torchvision
  implements: ``mnasnet0_5``, ``mnasnet0_75``, ``mnasnet1_0``, ``mnasnet1_3`` (torchvision's names).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.layers import make_divisible
from cnnlab.layers.init import tf_mobile_init
from cnnlab.models._convert import rename_keys
from cnnlab.models.mobilenet import MBConvNet, MBConvStage, convert_timm_mbconvnet, scale_stages
from cnnlab.models.registry import Family, StateDict, overwrite_param, register_model

# The TF reference's BN decay 0.9997, in PyTorch's convention (momentum = 1 - decay).
BN_MOMENTUM = 1 - 0.9997

# MnasNet-B1 (authors' TF code, mnasnet_models.mnasnet_b1; torchvision's MNASNet): t, k, s, c, n.
# The first row is the "SepConv" of Fig. 7: a depthwise 3x3 then a linear 1x1 (MBConv with t=1).
MNASNET_B1_STAGES = (
    MBConvStage(1, 3, 1, 16, 1),  # 112x112, SepConv
    MBConvStage(3, 3, 2, 24, 3),  # 56x56
    MBConvStage(3, 5, 2, 40, 3),  # 28x28
    MBConvStage(6, 5, 2, 80, 3),  # 14x14
    MBConvStage(6, 3, 1, 96, 2),  # 14x14
    MBConvStage(6, 5, 2, 192, 4),  # 7x7
    MBConvStage(6, 3, 1, 320, 1),  # 7x7
)


# Tan et al. 2019, Fig. 7 (MnasNet-A1): SE (ratio 0.25 of the block input) in the 40, 112, 160 rows.
MNASNET_A1_STAGES = (
    MBConvStage(1, 3, 1, 16, 1),  # 112x112, SepConv
    MBConvStage(6, 3, 2, 24, 2),  # 56x56
    MBConvStage(3, 5, 2, 40, 3, se_ratio=0.25),  # 28x28
    MBConvStage(6, 3, 2, 80, 4),  # 14x14
    MBConvStage(6, 3, 1, 112, 2, se_ratio=0.25),  # 14x14
    MBConvStage(6, 5, 2, 160, 3, se_ratio=0.25),  # 7x7
    MBConvStage(6, 3, 1, 320, 1),  # 7x7
)


def convert_torchvision_mnasnet(state_dict: StateDict) -> StateDict:
    """torchvision ``mnasnet*`` (one flat ``layers`` Sequential) -> cnnlab.

    ``layers.0-7`` are the stem conv and the SepConv, ``layers.8-13`` the six MBConv stacks
    (each ``_InvertedResidual.layers``: 0/1 expand, 3/4 depthwise, 6/7 project), ``layers.14-15``
    the head conv.
    """
    inner = {"0": "expand.conv", "1": "expand.norm", "3": "dw.conv", "4": "dw.norm", "6": "project.conv",
             "7": "project.norm"}
    stacked = {}
    rest = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "layers" and 8 <= int(parts[1]) <= 13:
            stacked[".".join(["stages", str(int(parts[1]) - 7), parts[2], inner[parts[4]], *parts[5:]])] = value
        else:
            rest[key] = value
    stacked.update(rename_keys(rest, [
        (r"layers\.0\.weight", "stem.conv.weight"),
        (r"layers\.1\.(.*)", r"stem.norm.\1"),
        (r"layers\.3\.weight", "stages.0.0.dw.conv.weight"),
        (r"layers\.4\.(.*)", r"stages.0.0.dw.norm.\1"),
        (r"layers\.6\.weight", "stages.0.0.project.conv.weight"),
        (r"layers\.7\.(.*)", r"stages.0.0.project.norm.\1"),
        (r"layers\.14\.weight", "conv_head.conv.weight"),
        (r"layers\.15\.(.*)", r"conv_head.norm.\1"),
        (r"classifier\.1\.(weight|bias)", r"fc.\1"),
    ]))
    return stacked


MNASNET = Family(
    name="MnasNet",
    paper="Tan et al., MnasNet: Platform-Aware Neural Architecture Search for Mobile",
    year=2019,
    url="https://arxiv.org/abs/1807.11626",
    converters={"torchvision": convert_torchvision_mnasnet, "timm": convert_timm_mbconvnet},
)


class MnasNet(MBConvNet):
    """MnasNet: ``MBConvNet`` with ReLU, TF's BN momentum and a searched table (Args: as ``MBConvNet``)."""

    # the TF TPU code of the paper's authors (see tf_mobile_init), as in timm, which has every MnasNet width
    # (torchvision only the B1 ones)
    reference_init = staticmethod(tf_mobile_init)


def mnasnet(alpha: float, table: tuple[MBConvStage, ...] = MNASNET_B1_STAGES, **kwargs) -> MnasNet:
    """MnasNet with depth multiplier ``alpha`` on every width but the 1280-wide head (as torchvision, timm)."""
    if alpha <= 0:
        raise CnnlabError(f"the width multiplier alpha must be > 0, got {alpha}")
    kwargs.setdefault("stages", scale_stages(table, alpha))
    # Stem and SepConv widths scale too (torchvision's MNASNet version 2; version 1 kept 32/16).
    kwargs.setdefault("stem_channels", make_divisible(32 * alpha, 8))
    kwargs.setdefault("head_channels", 1280)
    kwargs.setdefault("drop_rate", 0.2)
    kwargs.setdefault("act_layer", nn.ReLU)
    kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, momentum=BN_MOMENTUM))
    return MnasNet(**kwargs)


def _variant(alpha: float, table: tuple[MBConvStage, ...], kwargs: dict) -> MnasNet:
    """A registered width: a caller's conflicting ``alpha`` or ``table`` is an error, not a TypeError."""
    overwrite_param(kwargs, "alpha", alpha)
    overwrite_param(kwargs, "table", table)
    return mnasnet(**kwargs)


@register_model(MNASNET, pretrained={"torchvision": "mnasnet0_5"}, notes="MnasNet-B1, width 0.5")
def mnasnet0_5(**kwargs) -> MnasNet:
    return _variant(0.5, MNASNET_B1_STAGES, kwargs)


@register_model(MNASNET, pretrained={"torchvision": "mnasnet0_75"}, notes="MnasNet-B1, width 0.75")
def mnasnet0_75(**kwargs) -> MnasNet:
    return _variant(0.75, MNASNET_B1_STAGES, kwargs)


@register_model(MNASNET, pretrained={"torchvision": "mnasnet1_0", "timm": "mnasnet_100"},
                notes="MnasNet-B1, width 1.0 (4.4M parameters)")
def mnasnet1_0(**kwargs) -> MnasNet:
    return _variant(1.0, MNASNET_B1_STAGES, kwargs)


@register_model(MNASNET, pretrained={"torchvision": "mnasnet1_3"}, notes="MnasNet-B1, width 1.3")
def mnasnet1_3(**kwargs) -> MnasNet:
    return _variant(1.3, MNASNET_B1_STAGES, kwargs)


# Paper parameter count: Tan et al. 2019, Table 1 (MnasNet-A1: 3.9M parameters, 312M multiply-adds).
@register_model(MNASNET, pretrained={"timm": "semnasnet_100"},
                notes="MnasNet-A1 (Fig. 7, with SE), width 1.0: 3.9M parameters")
def semnasnet_100(**kwargs) -> MnasNet:
    return _variant(1.0, MNASNET_A1_STAGES, kwargs)


@register_model(MNASNET, pretrained={"timm": "semnasnet_075"}, notes="MnasNet-A1 (Fig. 7, with SE), width 0.75")
def semnasnet_075(**kwargs) -> MnasNet:
    return _variant(0.75, MNASNET_A1_STAGES, kwargs)
