"""SqueezeNet 1.0 and 1.1: counts, torchvision oracle, the 1x1-conv classifier, input sizes."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models import squeezenet as sq
from tests.models._helpers import assert_smallest_input
from tests.oracle import check_converted, meta_count


@pytest.mark.parametrize("name,count", [("squeezenet1_0", 1_248_424), ("squeezenet1_1", 1_235_496)])
def test_parameter_count(name, count):
    # Iandola et al. 2016 Table 1: 1,248,424 parameters for SqueezeNet (1.0) before compression;
    # both equal torchvision's (its weights metadata: 1,248,424 and 1,235,496).
    assert meta_count(getattr(sq, name)) == meta_count(getattr(torchvision.models, name)) == count


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_same_output_as_torchvision(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)()
    assert check_converted(name, reference, input_size=64) <= 1e-4
    with torch.no_grad():
        assert reference.eval()(torch.randn(1, 3, 64, 64)).abs().sum() > 0  # not an all-zero comparison


def test_other_version_is_refused():
    reference = torchvision.models.squeezenet1_0()
    with pytest.raises(CnnlabError, match="weights do not fit"):
        cnnlab.load_weights(cnnlab.create_model("squeezenet1_1"), reference.state_dict())


def test_classifier_is_a_1x1_conv_and_resets():
    model = cnnlab.create_model("squeezenet1_1", num_classes=10).eval()
    head = model.get_classifier()
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == 10
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # no fully connected layer (§3.3)
    model.reset_classifier(4)
    assert isinstance(model.final_conv, nn.Conv2d) and model.final_conv.out_channels == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name,smallest", [("squeezenet1_0", 21), ("squeezenet1_1", 17)])
def test_min_input_size_is_exact(name, smallest):
    # torchvision's weights metadata gives the same minimum sizes (21 and 17)
    assert_smallest_input(name, smallest)


def test_stages_and_strides_match_table_1():
    # Iandola et al. 2016 Table 1 (227x227 input, as the authors' Caffe model): conv1 96@111x111,
    # maxpool1 55x55, fire2-4 at 55, maxpool4 27, fire5-8 at 27, maxpool8 13, fire9 512@13x13.
    with torch.device("meta"):
        model = cnnlab.create_model("squeezenet1_0")
        maps = model.forward_intermediates(torch.empty(1, 3, 227, 227))
    assert [(f.stride, m.shape[1], m.shape[-1]) for f, m in zip(model.feature_info, maps)] == [
        (2, 96, 111), (4, 256, 55), (8, 512, 27), (16, 512, 13),
    ]
    fires = [m for m in model.modules() if m.__class__.__name__ == "Fire"]
    assert [f.squeeze.conv.out_channels for f in fires] == [16, 16, 32, 32, 48, 48, 64, 64]


def test_options():
    model = cnnlab.create_model("squeezenet1_0", in_channels=1, num_classes=2, norm_layer=nn.BatchNorm2d, drop_rate=0.0)
    assert isinstance(model.stem.norm, nn.BatchNorm2d)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    with pytest.raises(CnnlabError, match="conflicts"):
        cnnlab.create_model("squeezenet1_0", config=sq.SQUEEZENET1_1)


def test_built_without_classifier_then_given_one():
    model = cnnlab.create_model("squeezenet1_1", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (1, 512) and model.num_classes == 0
        model.reset_classifier(6)
        assert isinstance(model.final_conv, nn.Conv2d) and model(x).shape == (1, 6)  # a conv again, not a Linear
