"""MnasNet (B1, torchvision's variant) versus torchvision."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.models.mnasnet import BN_MOMENTUM
from tests.models._mobile_oracle import TIMM_MBCONV_TAPS, check_converted_stages
from tests.oracle import meta_count

torchvision = pytest.importorskip("torchvision")
from torchvision.models import mnasnet as tv_mnasnet  # noqa: E402

VARIANTS = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_count_equals_torchvision(name):
    assert meta_count(cnnlab.create_model, name) == meta_count(torchvision.models.get_model, name)


def test_same_output_as_torchvision():
    torch.manual_seed(0)
    # taps: the SepConv's last BN, the stride-4/8 stacks, the last stride-16 stack, the head's ReLU
    check_converted_stages("mnasnet1_0", torchvision.models.mnasnet1_0(),
                           ["layers.7", "layers.8", "layers.9", "layers.11", "layers.16"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_widths_follow_torchvision_rounding(name):
    # torchvision's _get_depths: stem, SepConv and the six stacks all scaled and rounded to 8
    depths = tv_mnasnet._get_depths(VARIANTS[name])
    with torch.device("meta"):
        model = cnnlab.create_model(name)
    assert model.stem.conv.out_channels == depths[0]
    assert [s[0].out_channels for s in model.stages] == depths[1:]
    assert model.conv_head.conv.out_channels == 1280  # the head is not scaled


def test_tf_batch_norm_momentum_and_relu():
    with torch.device("meta"):
        model = cnnlab.create_model("mnasnet0_5")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(1 - 0.9997) for m in norms) and BN_MOMENTUM == pytest.approx(3e-4)
    assert {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU))} == {nn.ReLU}
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]


# --- MnasNet-A1 (the paper's Fig. 7), timm's semnasnet ----------------------------------------

@pytest.mark.parametrize("name", ["semnasnet_100", "semnasnet_075"])
def test_a1_param_count_equals_timm(name):
    timm = pytest.importorskip("timm")
    assert meta_count(cnnlab.create_model, name) == meta_count(timm.create_model, name)


def test_a1_paper_counts():
    from tests.models._mobile_oracle import mult_adds

    # Tan et al. 2019, Table 1: MnasNet-A1 3.9M parameters, 312M multiply-adds
    model = cnnlab.create_model("semnasnet_100")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 3.9
    assert mult_adds(model, 224) / 1e6 == pytest.approx(312, rel=0.01)
    # SE only in the 40-, 112- and 160-channel stages (Fig. 7)
    with_se = [all(hasattr(b.attn, "fc1") for b in s) for s in model.stages]
    assert with_se == [False, False, True, False, True, True, False]


def test_same_output_as_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    check_converted_stages("semnasnet_100", timm.create_model("semnasnet_100"), TIMM_MBCONV_TAPS)
    check_converted_stages("mnasnet1_0", timm.create_model("mnasnet_100"), TIMM_MBCONV_TAPS, input_size=32)


def test_options_in_channels_no_classifier_and_bad_rates():
    model = cnnlab.create_model("mnasnet0_5", in_channels=1, num_classes=0, drop_rate=0.5).eval()
    assert isinstance(model.fc, nn.Identity) and model.num_classes == 0
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 1280)  # pre-logit features
    model.reset_classifier(10)
    assert model(x).shape == (2, 10) and model.drop.p == 0.5
    with pytest.raises(cnnlab.CnnlabError, match="drop_path_rate must be in"):
        cnnlab.create_model("mnasnet0_5", drop_path_rate=1.0)


def test_a_conflicting_width_is_a_clear_error():
    with pytest.raises(cnnlab.CnnlabError, match="alpha=2 conflicts"):
        cnnlab.create_model("mnasnet0_5", alpha=2)
    assert cnnlab.create_model("mnasnet0_5", alpha=0.5, num_classes=3).num_classes == 3  # the variant's own value is fine
