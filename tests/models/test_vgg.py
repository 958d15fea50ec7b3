"""VGG 11/13/16/19 with and without BN: exact counts (meta device), torchvision oracle, the notes' VGG-16 facts."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.layers import ConvNormAct
from cnnlab.models import vgg as vgg_module
from tests.oracle import check_converted, meta_count

NAMES = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_torchvision(name):
    ours = meta_count(getattr(vgg_module, name))
    assert ours == meta_count(getattr(torchvision.models, name)) == cnnlab.model_info(name).num_params
    assert f"{ours:,}" in cnnlab.model_info(name).notes


def test_table_2_parameter_counts_in_millions():
    # Simonyan & Zisserman 2015 Table 2: A 133, B 133, D 138, E 144 million parameters
    for name, millions in (("vgg11", 133), ("vgg13", 133), ("vgg16", 138), ("vgg19", 144)):
        assert round(cnnlab.model_info(name).num_params / 1e6) == millions


def test_vgg16_is_138m_mostly_in_fc_layers():
    # Simonyan & Zisserman 2015 Table 2: 138M parameters for configuration D (VGG-16)
    with torch.device("meta"):
        model = cnnlab.create_model("vgg16")
    total = sum(p.numel() for p in model.parameters())
    assert total == 138_357_544
    fc = sum(p.numel() for p in model.head.parameters())
    assert fc == 123_642_856 and fc / total > 0.89  # the late FC layers hold most parameters
    assert model.head.fc6.weight.numel() == 512 * 7 * 7 * 4096  # fc6 alone: 102.8M


def test_vgg16_activation_memory():
    # The notes' VGG-16 table: memory = outputs of the input, every conv, every pool, every FC,
    # at 224x224. Their rows sum to 15,237,608 values (61 MB in float32) per image, not the
    # "24M = 96 MB" total they state. Most of it sits in the first two stages.
    with torch.device("meta"):
        model = cnnlab.create_model("vgg16").eval()
        sizes: list[tuple[str, int]] = []
        hooks = [m.register_forward_hook(lambda m_, _i, out, n=n: sizes.append((n, out[0].numel())))
                 for n, m in model.named_modules() if isinstance(m, (ConvNormAct, nn.MaxPool2d, nn.Linear))]
        x = torch.empty(1, 3, 224, 224)
        model(x)
    for h in hooks:
        h.remove()
    total = x[0].numel() + sum(n for _, n in sizes)
    assert total == 15_237_608
    early = sum(n for name, n in sizes if name.startswith(("stages.0", "stages.1")))
    assert 0.70 < early / total < 0.72  # 10,838,016 / 15,237,608
    assert sizes[0] == ("stages.0.0", 224 * 224 * 64)


def test_stage_table():
    # Simonyan & Zisserman 2015 Table 1: configurations A (11), D (16), E (19) weight layers
    assert [s.num_convs for s in vgg_module.VGG16] == [2, 2, 3, 3, 3]
    assert [s.out_channels for s in vgg_module.VGG19] == [64, 128, 256, 512, 512]
    assert sum(s.num_convs for s in vgg_module.VGG11) + 3 == 11 and sum(s.num_convs for s in vgg_module.VGG19) + 3 == 19


@pytest.mark.parametrize("name,reference", [("vgg11", torchvision.models.vgg11), ("vgg16_bn", torchvision.models.vgg16_bn)])
def test_same_output_as_torchvision(name, reference):
    torch.manual_seed(0)
    theirs = reference()
    assert check_converted(name, theirs, input_size=32) <= 1e-4
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert theirs.eval()(x).std() > 1e-3  # the comparison is not between two constants


def test_wrong_depth_checkpoint_is_refused():
    # vgg11's 8 convs cannot be read as vgg13's 10: the converter refuses, the layout stays cnnlab's
    from cnnlab.models.vgg import _tv_converter

    sd = {f"features.{i}.weight": torch.zeros(1, 1, 3, 3) for i in range(8)}
    sd.update({f"classifier.{i}.weight": torch.zeros(1, 1) for i in (0, 3, 6)})
    with pytest.raises(KeyError):
        _tv_converter(vgg_module.VGG13)(sd)
    converted = _tv_converter(vgg_module.VGG11)(sd)
    assert "stages.4.1.conv.weight" in converted and "head.fc6.weight" in converted


def test_options_and_forced_table():
    with torch.device("meta"):
        model = cnnlab.create_model("vgg11_bn", in_channels=1, num_classes=10)
    assert model.stages[0][0].conv.in_channels == 1 and model.head.fc.out_features == 10
    assert isinstance(model.stages[0][0].norm, nn.BatchNorm2d)
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    with pytest.raises(CnnlabError, match="conflicts"):
        cnnlab.create_model("vgg16", stages=vgg_module.VGG11)
