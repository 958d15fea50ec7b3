"""Xception: the paper's parameter count and layer count, timm's outputs, feature map sizes."""
from __future__ import annotations

import timm
import torch
from torch import nn

import cnnlab
from cnnlab.layers import SeparableConv2d
from cnnlab.models import model_info
from tests.oracle import check_converted, meta_count


def test_param_count_is_the_papers():
    # Chollet 2017, Table 3: Xception 22,855,952 parameters; timm's legacy_xception has the same
    assert model_info("xception").num_params == 22_855_952
    assert meta_count(timm.create_model, "legacy_xception", pretrained=False) == 22_855_952


def test_36_conv_layers_in_the_feature_base():
    # §4.1 / Fig. 5: "36 convolutional layers forming the feature extraction base"
    # (2 stem convs + 34 separable convs; the 1x1 shortcut projections are not counted)
    with torch.device("meta"):
        model = cnnlab.create_model("xception")
    separable = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    stem = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
    assert len(separable) + len(stem) == 36
    assert len(model.middle_flow) == 8
    assert all(isinstance(b.shortcut, nn.Identity) and len(b.residual) == 3 for b in model.middle_flow)
    assert all(b.shortcut.conv.stride == (2, 2) for b in [*model.entry_flow, model.exit_flow[0]])


def test_feature_maps_at_299_follow_fig5():
    with torch.device("meta"):
        model = cnnlab.create_model("xception")
        maps = model.forward_intermediates(torch.empty(1, 3, 299, 299))
    # 299 -> 149 -> 147 (unpadded stem), then 74, 37, 19 (middle flow 19x19x728), exit flow 10x10x2048
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 147, 147), (128, 74, 74), (256, 37, 37), (728, 19, 19), (2048, 10, 10)]
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]


def test_timm_weights_give_same_output():
    torch.manual_seed(0)
    reference = timm.create_model("legacy_xception", pretrained=False)
    assert check_converted("xception", reference, input_size=64, init="none") <= 1e-4
