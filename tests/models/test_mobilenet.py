"""MobileNet v1 versus timm and the paper, MobileNet v2 versus torchvision and the paper."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models import model_info
from cnnlab.models.mobilenet import MobileNetV1
from tests.models._mobile_oracle import TIMM_MBCONV_TAPS, check_converted_stages, mult_adds
from tests.oracle import meta_count

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def params_without_norm(model: nn.Module) -> int:
    """Conv and FC parameters only: the papers count no BN scale/shift (folded at inference)."""
    norm = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - norm


# --- MobileNet v1 -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenetv1_100", "mobilenetv1_125"])
def test_v1_param_count_equals_timm(name):
    # timm builds mobilenetv1_* with its EfficientNet class: 4,231,976 parameters at width 1.0
    assert meta_count(cnnlab.create_model, name) == meta_count(timm.create_model, name)


# Howard et al. 2017, Table 6 (224x224): width -> (million parameters, million mult-adds), to the
# paper's precision. Table 1's breakdown totals 569M mult-adds at width 1.0.
V1_PAPER = {"mobilenetv1_100": (4.2, 569), "mobilenetv1_075": (2.6, 325), "mobilenetv1_050": (1.3, 149),
            "mobilenetv1_025": (0.5, 41)}


@pytest.mark.parametrize("name", sorted(V1_PAPER))
def test_v1_paper_params(name):
    assert round(model_info(name).num_params / 1e6, 1) == V1_PAPER[name][0]


@pytest.mark.parametrize("name", ["mobilenetv1_100", "mobilenetv1_025"])
def test_v1_paper_mult_adds(name):
    macs = mult_adds(cnnlab.create_model(name), 224) / 1e6
    assert round(macs) == pytest.approx(V1_PAPER[name][1], abs=1)


def test_v1_same_output_as_timm():
    reference = timm.create_model("mobilenetv1_100")
    check_converted_stages("mobilenetv1_100", reference, [f"blocks.{i}" for i in range(5)])


def test_v1_structure_is_table_1():
    model = cnnlab.create_model("mobilenetv1_100")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # "Counting depthwise and pointwise convolutions as separate layers, MobileNet has 28 layers" (with the FC)
    assert len(convs) + 1 == 28
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert [f.channels for f in model.feature_info] == [64, 128, 256, 512, 1024]
    assert sum(c.groups > 1 for c in convs) == 13


def test_v1_width_is_fixed_by_name_and_option_of_the_class():
    with pytest.raises(CnnlabError, match="width_mult=0.5 conflicts"):
        cnnlab.create_model("mobilenetv1_100", width_mult=0.5)
    assert cnnlab.create_model("mobilenetv1_050", width_mult=0.5).feature_info[-1].channels == 512
    with torch.device("meta"):
        assert MobileNetV1(width_mult=0.35).feature_info[-1].channels == 360  # make_divisible(358.4, 8)


def test_v1_rejects_drop_path_and_takes_paper_relu():
    with pytest.raises(CnnlabError, match="no residual connections"):
        cnnlab.create_model("mobilenetv1_100", drop_path_rate=0.1)
    model = cnnlab.create_model("mobilenetv1_025", act_layer="relu")  # the paper's text; default ReLU6 (TF-slim, timm)
    assert isinstance(model.stem.act, nn.ReLU) and not isinstance(model.stem.act, nn.ReLU6)


# --- MobileNet v2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("width_mult", [1.0, 0.5, 1.4])
def test_v2_param_count_equals_torchvision(width_mult):
    theirs = meta_count(torchvision.models.mobilenet_v2, width_mult=width_mult)
    assert meta_count(cnnlab.create_model, "mobilenet_v2", width_mult=width_mult) == theirs


def test_v2_paper_counts():
    model = cnnlab.create_model("mobilenet_v2")
    # Sandler et al. 2018, Table 4: 3.4M parameters, 300M mult-adds. The authors' TF-slim README gives
    # 3.47M, their conv + FC weights (BN folded): 3,470,760; with BN scale/shift it is 3,504,872.
    assert params_without_norm(model) == pytest.approx(3.47e6, rel=0.001)
    assert mult_adds(model, 224) / 1e6 == pytest.approx(300, rel=0.01)


# torchvision's flat features list: the last block at each stride, then features.18, the head conv
TV_V2_TAPS = ["features.1", "features.3", "features.6", "features.13", "features.18"]


def test_v2_same_output_as_torchvision():
    check_converted_stages("mobilenet_v2", torchvision.models.mobilenet_v2(), TV_V2_TAPS)


def test_v2_width_mult_converts_too():
    torch.manual_seed(0)
    check_converted_stages("mobilenet_v2", torchvision.models.mobilenet_v2(width_mult=0.5), TV_V2_TAPS,
                           input_size=32, width_mult=0.5)


def test_v2_table_2_structure():
    model = cnnlab.create_model("mobilenet_v2")
    assert [len(s) for s in model.stages] == [1, 2, 3, 4, 3, 3, 1]  # n column of Table 2
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert [f.channels for f in model.feature_info] == [16, 24, 32, 96, 1280]
    assert all(isinstance(b.dw.act, nn.ReLU6) and not hasattr(b.project, "act") for s in model.stages for b in s)
    assert sum(b.has_residual for s in model.stages for b in s) == 10  # every repeat after a row's first


def test_bad_width_mult():
    with pytest.raises(CnnlabError, match="width_mult must be > 0"):
        cnnlab.create_model("mobilenet_v2", width_mult=0)


def test_v2_same_output_as_timm():
    torch.manual_seed(0)
    check_converted_stages("mobilenet_v2", timm.create_model("mobilenetv2_100"), TIMM_MBCONV_TAPS, input_size=32)
