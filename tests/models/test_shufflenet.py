"""ShuffleNet v1 and v2: the papers' tables, complexity and parameter counts; torchvision's v2 outputs."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models.shufflenet import SHUFFLENET_V1_TABLE1
from tests.models._helpers import macs as count_macs
from tests.oracle import check_converted, meta_count


def macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-adds of the convs and linears (what the papers call FLOPs), counted on the meta device."""
    return count_macs(model, torch.empty(1, 3, size, size, device="meta"))


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cnnlab.create_model(name, **kwargs).eval()


def test_mac_counter_agrees_with_fvcore():
    from fvcore.nn import FlopCountAnalysis

    model = cnnlab.create_model("shufflenet_v1_g3", init="none").eval()
    fv = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    fv.unsupported_ops_warnings(False)
    fv.uncalled_modules_warnings(False)
    ops = fv.by_operator()  # fvcore counts one multiply-add as one flop
    assert macs(meta_model("shufflenet_v1_g3")) == ops["conv"] + ops["linear"]


# -- v1 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("column", SHUFFLENET_V1_TABLE1, ids=lambda c: f"g{c.groups}")
def test_v1_table1_channels_and_complexity(column):
    model = meta_model(f"shufflenet_v1_g{column.groups}")
    assert [f.channels for f in model.feature_info[2:]] == list(column.stage_channels)
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    # Table 1's complexity (143/140/137/133/137 MFLOPs); we count 143.1/140.8/137.5/134.3/138.4
    assert macs(model) / 1e6 == pytest.approx(column.mflops, rel=0.015)


def test_v1_first_pointwise_conv_is_not_grouped():
    model = meta_model("shufflenet_v1_g8")
    units = [u for stage in model.stages for u in stage]
    assert units[0].branch.conv1.conv.groups == 1  # §3.3: stage 2's input (24 maps) is too narrow to group
    assert all(u.branch.conv1.conv.groups == 8 and u.branch.conv3.conv.groups == 8 for u in units[1:])
    assert len(units) == 16  # 1 + 3, 1 + 7, 1 + 3


@pytest.mark.parametrize("groups,width,expected", [
    # exact counts of megvii-model/ShuffleNet-Series ShuffleNetV1/network.py (the authors' release, whose
    # README rounds them to 1.9M, 2.4M, 0.7M, 5.4M) plus 1,000: our classifier has a bias, theirs has none
    (3, 1.0, 1_864_728 + 1000),
    (8, 1.0, 2_433_768 + 1000),
    (3, 0.5, 717_324 + 1000),
    (3, 2.0, 5_449_776 + 1000),
    (8, 0.5, 1_010_448 + 1000),
])
def test_v1_param_counts_match_reference_implementation(groups, width, expected):
    assert meta_count(cnnlab.create_model, f"shufflenet_v1_g{groups}", width_mult=width) == expected


def test_v1_width_multiplier_scales_complexity():
    # Table 2: ShuffleNet 0.5x (g=3) is 38 MFLOPs; megvii's README: 2.0x (g=3) 524M
    assert macs(meta_model("shufflenet_v1_g3", width_mult=0.5)) / 1e6 == pytest.approx(38, rel=0.015)
    assert macs(meta_model("shufflenet_v1_g3", width_mult=2.0)) / 1e6 == pytest.approx(524, rel=0.01)


def test_v1_group_errors():
    with pytest.raises(CnnlabError, match="conflicts"):
        cnnlab.create_model("shufflenet_v1_g3", groups=8)
    from cnnlab.models.shufflenet import ShuffleNetV1

    with pytest.raises(CnnlabError, match=r"one of Table 1's \[1, 2, 3, 4, 8\]"):
        ShuffleNetV1(groups=5)


# -- v2 -------------------------------------------------------------------------------------

V2 = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]


@pytest.mark.parametrize("name", V2)
def test_v2_param_count_matches_torchvision(name):
    # torchvision's metadata: 1,366,792 / 2,278,604 / 3,503,624 / 7,393,996 (Table 5: 1.4M, 2.3M, 3.5M, 7.4M)
    assert meta_count(cnnlab.create_model, name) == meta_count(getattr(torchvision.models, name))


@pytest.mark.parametrize("name,mflops", list(zip(V2, (41, 146, 299, 591))))
def test_v2_table5_complexity(name, mflops):
    # Table 5's FLOPs; we count 40.5/144.9/295.8/583.3 M multiply-adds (the table's rounding is a little loose)
    assert macs(meta_model(name)) / 1e6 == pytest.approx(mflops, rel=0.02)


def test_v2_torchvision_weights_give_same_output():
    torch.manual_seed(0)
    assert check_converted("shufflenet_v2_x1_0", torchvision.models.shufflenet_v2_x1_0(), input_size=64, init="none") <= 1e-4


def test_v2_feature_info():
    model = meta_model("shufflenet_v2_x1_0")
    assert [(f.module, f.channels, f.stride) for f in model.feature_info] == [
        ("stem.conv", 24, 2), ("stem", 24, 4), ("stages.0", 116, 8), ("stages.1", 232, 16), ("conv_last", 1024, 32),
    ]
