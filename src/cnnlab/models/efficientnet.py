"""EfficientNet B0-B7 (Tan & Le 2019): the B0 table scaled in depth, width and resolution.

Compound scaling (the paper's eq. 3) scales a baseline by one coefficient phi::

    depth d = alpha^phi,  width w = beta^phi,  resolution r = gamma^phi,
    with alpha * beta^2 * gamma^2 ~= 2 (alpha=1.2, beta=1.1, gamma=1.15, found by grid search),

so each step of phi roughly doubles the FLOPs (which grow as d * w^2 * r^2). The released
B1-B7 do not sit at integer phi: their (width, depth, resolution) are round values near
this rule (``EFFICIENTNET_B*`` below, as in the authors' TF code and torchvision). Fitting phi
to each variant (``fit_phi``) puts every official coefficient within 8% of ``compound_scaling(phi)``
(B2 is phi ~= 1: rule 1.20/1.10/258 px vs official 1.2/1.1/260 px). ``tests/models/test_efficientnet.py``
checks this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from torch import nn

from cnnlab.layers import make_divisible
from cnnlab.layers.init import tf_mobile_init
from cnnlab.models._convert import rename_keys
from cnnlab.models.mobilenet import (
    TORCHVISION_CNA,
    MBConvNet,
    MBConvStage,
    convert_timm_mbconvnet,
    scale_stages,
    torchvision_stem_head_rules,
)
from cnnlab.models.registry import Family, StateDict, register_model

# Tan & Le 2019, Sec. 3.3: the grid-searched constants of eq. 3.
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15


def compound_scaling(
    phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA
) -> tuple[float, float, float]:
    """(depth, width, resolution) multipliers ``(alpha^phi, beta^phi, gamma^phi)`` (eq. 3).

    FLOPs scale by ``(alpha * beta^2 * gamma^2)^phi`` ~= ``2^phi``.
    """
    return alpha**phi, beta**phi, gamma**phi


def fit_phi(depth: float, width: float, resolution: float, alpha: float = ALPHA, beta: float = BETA,
            gamma: float = GAMMA) -> float:
    """The phi whose compound multipliers best match given ones (least squares on the logs)."""
    logs = (math.log(depth), math.log(width), math.log(resolution))
    bases = (math.log(alpha), math.log(beta), math.log(gamma))
    return sum(m * b for m, b in zip(logs, bases)) / sum(b * b for b in bases)


# Tan & Le 2019, Table 1 (EfficientNet-B0): MBConv{t}, kernel, stride, channels, layers; SE 0.25
# in every block (Sec. 4). Strides are those of the authors' code (the table lists resolutions).
EFFICIENTNET_B0_STAGES = (
    MBConvStage(1, 3, 1, 16, 1, se_ratio=0.25),  # 112x112
    MBConvStage(6, 3, 2, 24, 2, se_ratio=0.25),  # 56x56
    MBConvStage(6, 5, 2, 40, 2, se_ratio=0.25),  # 28x28
    MBConvStage(6, 3, 2, 80, 3, se_ratio=0.25),  # 14x14
    MBConvStage(6, 5, 1, 112, 3, se_ratio=0.25),  # 14x14
    MBConvStage(6, 5, 2, 192, 4, se_ratio=0.25),  # 7x7
    MBConvStage(6, 3, 1, 320, 1, se_ratio=0.25),  # 7x7
)


@dataclass(frozen=True)
class EfficientNetParams:
    """One variant's official coefficients (authors' TF ``efficientnet_params``; torchvision).

    ``norm_eps``/``norm_momentum`` follow torchvision, whose B0-B4 weights were trained with
    PyTorch's BN defaults and B5-B7 ported from TF (eps 1e-3, momentum 0.01 in PyTorch's terms).
    """

    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1


EFFICIENTNET_B0 = EfficientNetParams(1.0, 1.0, 224, 0.2)
EFFICIENTNET_B1 = EfficientNetParams(1.0, 1.1, 240, 0.2)
EFFICIENTNET_B2 = EfficientNetParams(1.1, 1.2, 260, 0.3)
EFFICIENTNET_B3 = EfficientNetParams(1.2, 1.4, 300, 0.3)
EFFICIENTNET_B4 = EfficientNetParams(1.4, 1.8, 380, 0.4)
EFFICIENTNET_B5 = EfficientNetParams(1.6, 2.2, 456, 0.4, 1e-3, 0.01)
EFFICIENTNET_B6 = EfficientNetParams(1.8, 2.6, 528, 0.5, 1e-3, 0.01)
EFFICIENTNET_B7 = EfficientNetParams(2.0, 3.1, 600, 0.5, 1e-3, 0.01)


def convert_torchvision_efficientnet(state_dict: StateDict) -> StateDict:
    """torchvision ``efficientnet_b*`` -> cnnlab: ``features.0`` stem, ``features.1-7`` stages, ``features.8`` head."""
    out, rest = {}, {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[3:4] == ["block"]:  # features.{stage+1}.{block}.block.{layer}...
            # block.0-3: expand CNA, depthwise CNA, SE, project CNA; MBConv1 has no expand
            names = ["expand", "dw", "attn", "project"]
            if not any(k.startswith(".".join(parts[:4]) + ".3.") for k in state_dict):
                names = names[1:]
            name = names[int(parts[4])]
            tail = parts[5:] if name == "attn" else [TORCHVISION_CNA[parts[5]], *parts[6:]]
            out[".".join(["stages", str(int(parts[1]) - 1), parts[2], name, *tail])] = value
        else:
            rest[key] = value
    last = max(int(k.split(".")[1]) for k in rest if k.startswith("features."))
    out.update(rename_keys(rest, torchvision_stem_head_rules(last)))
    return out


EFFICIENTNET = Family(
    name="EfficientNet",
    paper="Tan & Le, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    year=2019,
    url="https://arxiv.org/abs/1905.11946",
    converters={"torchvision": convert_torchvision_efficientnet, "timm": convert_timm_mbconvnet},
)


class EfficientNet(MBConvNet):
    """EfficientNet: ``MBConvNet`` with SiLU, SE in every block and a scaled B0 table (Args: as ``MBConvNet``)."""

    # the TF TPU code of the paper's authors, as timm's; torchvision's differs only in its depthwise convs (see tf_mobile_init)
    reference_init = staticmethod(tf_mobile_init)


def efficientnet(params: EfficientNetParams, **kwargs) -> EfficientNet:
    """EfficientNet from the B0 table and one variant's coefficients (channels to multiples of 8, depth ceil)."""
    w = params.width_mult
    kwargs.setdefault("stages", scale_stages(EFFICIENTNET_B0_STAGES, w, params.depth_mult))
    kwargs.setdefault("stem_channels", make_divisible(32 * w, 8))
    kwargs.setdefault("head_channels", make_divisible(1280 * w, 8))
    kwargs.setdefault("drop_rate", params.dropout)
    kwargs.setdefault("drop_path_rate", 0.2)  # stochastic depth, "survival probability 0.8" (Sec. 5.2)
    kwargs.setdefault("act_layer", nn.SiLU)  # swish (Ramachandran et al. 2017)
    kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=params.norm_eps, momentum=params.norm_momentum))
    return EfficientNet(**kwargs)


# Paper parameter counts: Tan & Le 2019, Table 2. timm's efficientnet_b0-b4 have the same layers and
# BN settings; its B5-B7 use PyTorch's BN eps where torchvision's (TF-ported) weights need 1e-3.
@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B0.resolution, EFFICIENTNET_B0.resolution),
                pretrained={"torchvision": "efficientnet_b0", "timm": "efficientnet_b0"},
                notes="paper (Table 2): 5.3M parameters")
def efficientnet_b0(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B0, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B1.resolution, EFFICIENTNET_B1.resolution),
                pretrained={"torchvision": "efficientnet_b1", "timm": "efficientnet_b1"},
                notes="paper (Table 2): 7.8M parameters")
def efficientnet_b1(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B1, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B2.resolution, EFFICIENTNET_B2.resolution),
                pretrained={"torchvision": "efficientnet_b2", "timm": "efficientnet_b2"},
                notes="paper (Table 2): 9.2M parameters")
def efficientnet_b2(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B2, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B3.resolution, EFFICIENTNET_B3.resolution),
                pretrained={"torchvision": "efficientnet_b3", "timm": "efficientnet_b3"},
                notes="paper (Table 2): 12M parameters")
def efficientnet_b3(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B3, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B4.resolution, EFFICIENTNET_B4.resolution),
                pretrained={"torchvision": "efficientnet_b4", "timm": "efficientnet_b4"},
                notes="paper (Table 2): 19M parameters")
def efficientnet_b4(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B4, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B5.resolution, EFFICIENTNET_B5.resolution),
                pretrained={"torchvision": "efficientnet_b5"},
                notes="paper (Table 2): 30M parameters")
def efficientnet_b5(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B5, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B6.resolution, EFFICIENTNET_B6.resolution),
                pretrained={"torchvision": "efficientnet_b6"},
                notes="paper (Table 2): 43M parameters")
def efficientnet_b6(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B6, **kwargs)


@register_model(EFFICIENTNET, default_input=(3, EFFICIENTNET_B7.resolution, EFFICIENTNET_B7.resolution),
                pretrained={"torchvision": "efficientnet_b7"},
                notes="paper (Table 2): 66M parameters")
def efficientnet_b7(**kwargs) -> EfficientNet:
    return efficientnet(EFFICIENTNET_B7, **kwargs)
