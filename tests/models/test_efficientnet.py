"""EfficientNet B0-B7: compound scaling, torchvision parity, the paper's counts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.models import efficientnet as eff
from cnnlab.models import model_info
from tests.models._mobile_oracle import TIMM_MBCONV_TAPS, check_converted_stages, mult_adds
from tests.oracle import meta_count

torchvision = pytest.importorskip("torchvision")

VARIANTS = [f"efficientnet_b{i}" for i in range(8)]
PARAMS = [eff.EFFICIENTNET_B0, eff.EFFICIENTNET_B1, eff.EFFICIENTNET_B2, eff.EFFICIENTNET_B3,
          eff.EFFICIENTNET_B4, eff.EFFICIENTNET_B5, eff.EFFICIENTNET_B6, eff.EFFICIENTNET_B7]
# torchvision's features.{1..7} are the seven table rows, features.8 the head conv
TV_TAPS = ["features.1", "features.2", "features.3", "features.5", "features.8"]


def test_compound_scaling_rule():
    assert eff.compound_scaling(0) == (1.0, 1.0, 1.0)
    d, w, r = eff.compound_scaling(2)
    assert (d, w, r) == pytest.approx((1.44, 1.21, 1.3225))
    # eq. 3's constraint: each unit of phi about doubles the FLOPs (d * w^2 * r^2)
    assert eff.ALPHA * eff.BETA**2 * eff.GAMMA**2 == pytest.approx(2, rel=0.05)
    d, w, r = eff.compound_scaling(3)
    assert d * w**2 * r**2 == pytest.approx((eff.ALPHA * eff.BETA**2 * eff.GAMMA**2) ** 3)


def test_official_coefficients_are_the_rounded_compound_rule():
    """B1-B7 sit near alpha^phi, beta^phi, gamma^phi for a phi that grows with the variant."""
    phis = []
    for p in PARAMS:
        phi = eff.fit_phi(p.depth_mult, p.width_mult, p.resolution / 224)
        depth, width, resolution = eff.compound_scaling(phi)
        assert p.depth_mult == pytest.approx(depth, rel=0.08)
        assert p.width_mult == pytest.approx(width, rel=0.08)
        assert p.resolution == pytest.approx(224 * resolution, rel=0.08)
        phis.append(phi)
    assert phis[0] == 0 and all(a < b for a, b in zip(phis, phis[1:]))
    assert phis[2] == pytest.approx(1, abs=0.05)  # B2 = phi 1: rule (1.2, 1.1, 258px) vs official (1.2, 1.1, 260px)
    assert phis[7] == pytest.approx(6.6, abs=0.1)


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_equals_torchvision(name):
    assert meta_count(cnnlab.create_model, name) == meta_count(torchvision.models.get_model, name)


# Tan & Le 2019, Table 2: parameters in millions, as printed (B3-B7 to the nearest million).
PAPER_PARAMS = {"efficientnet_b0": 5.3, "efficientnet_b1": 7.8, "efficientnet_b2": 9.2, "efficientnet_b3": 12,
                "efficientnet_b4": 19, "efficientnet_b5": 30, "efficientnet_b6": 43, "efficientnet_b7": 66}


@pytest.mark.parametrize("name", VARIANTS)
def test_paper_param_counts(name):
    paper = PAPER_PARAMS[name]
    half_digit = 0.05 if paper < 10 else 0.5
    # the printed figure, to its precision or within 1% (B2: 9,109,994 vs "9.2M", 0.98% off, as in torchvision)
    assert abs(model_info(name).num_params / 1e6 - paper) <= max(half_digit, 0.01 * paper)


def test_b0_paper_flops():
    # Table 2: B0 0.39B FLOPS, i.e. multiply-adds of convs (SE included) and the FC
    assert mult_adds(cnnlab.create_model("efficientnet_b0"), 224) / 1e9 == pytest.approx(0.39, abs=0.005)


def test_b0_same_output_as_torchvision():
    check_converted_stages("efficientnet_b0", torchvision.models.efficientnet_b0(), TV_TAPS)


def test_b1_same_output_as_torchvision():
    torch.manual_seed(0)
    check_converted_stages("efficientnet_b1", torchvision.models.efficientnet_b1(), TV_TAPS, input_size=32)


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_settings_match_torchvision(name):
    """Per layer, what the parameter count cannot see: BN eps/momentum, SE activation, stochastic depth."""
    with torch.device("meta"):
        ours = cnnlab.create_model(name)
        theirs = torchvision.models.get_model(name)

    def bn(m):
        return [(x.eps, x.momentum) for x in m.modules() if isinstance(x, nn.BatchNorm2d)]

    def acts(m):
        return [type(x).__name__ for x in m.modules() if isinstance(x, (nn.SiLU, nn.ReLU, nn.Sigmoid))]

    assert bn(ours) == bn(theirs)  # B5-B7: eps 1e-3, momentum 0.01 (weights ported from TF)
    assert acts(ours) == acts(theirs)
    ours_p = [b.drop_path.p if hasattr(b.drop_path, "p") else 0.0 for s in ours.stages for b in s]
    theirs_p = [b.stochastic_depth.p if b.use_res_connect else 0.0 for s in theirs.features[1:-1] for b in s]
    assert ours_p == pytest.approx(theirs_p)  # linear 0 -> 0.2 over the blocks
    assert ours.drop.p == theirs.classifier[0].p


def test_default_input_and_depth_scaling():
    assert [model_info(n).default_input for n in VARIANTS] == [(3, p.resolution, p.resolution) for p in PARAMS]
    with torch.device("meta"):
        b7 = cnnlab.create_model("efficientnet_b7")
    # depth: ceil(n * 3.1) per row of Table 1; width: make_divisible(c * 2.0, 8)
    assert [len(s) for s in b7.stages] == [math.ceil(n * 3.1) for n in (1, 2, 2, 3, 3, 4, 1)]
    assert [f.channels for f in b7.feature_info] == [32, 48, 80, 224, 2560]
    assert [f.stride for f in b7.feature_info] == [2, 4, 8, 16, 32]


def test_b0_same_output_as_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    check_converted_stages("efficientnet_b0", timm.create_model("efficientnet_b0"), TIMM_MBCONV_TAPS, input_size=32)
