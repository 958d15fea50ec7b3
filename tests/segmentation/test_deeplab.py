"""DeepLabv3/v3+: ASPP rates scaled to the output stride (vision#7956), dilated basic-block encoders
(vision#4801), torchvision's deeplabv3_resnet50 and smp's DeepLabV3Plus with the same logits, parameter counts,
any input size, bad input."""
from __future__ import annotations

import pytest
import torch
import torchvision

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.layers.aspp import ASPP, atrous_rates
from tests.oracle import randomize_norm_stats


def test_atrous_rates_follow_the_output_stride():
    # Chen et al. 2017 §4.3: (6, 12, 18) at output stride 16, doubled at 8
    assert atrous_rates(16) == (6, 12, 18) and atrous_rates(8) == (12, 24, 36)
    for output_stride, rates in [(16, (6, 12, 18)), (8, (12, 24, 36))]:
        with torch.device("meta"):
            model = cnnlab.create_model("deeplabv3", backbone="resnet18", num_classes=3, output_stride=output_stride)
        dilations = tuple(b.conv.dilation[0] for b in model.head.aspp.convs[1:4])
        assert dilations == rates and model.encoder.strides[-1] == output_stride


def test_aspp_branch_sizes_and_image_pooling():
    aspp = ASPP(16, (1, 2, 3), 8).eval()
    x = torch.randn(2, 16, 9, 13)
    with torch.no_grad():
        y = aspp(x)
        pooled = aspp.convs[4](x)
    assert y.shape == (2, 8, 9, 13)
    # the image-pooling branch is one value per channel, spread over the map
    torch.testing.assert_close(pooled, pooled[..., :1, :1].expand_as(pooled))


def test_deeplabv3_resnet50_equals_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                   num_classes=3, aux_loss=True)
    randomize_norm_stats(reference).eval()
    ours = cnnlab.create_model("deeplabv3_resnet50", num_classes=3, aux_loss=True)
    assert cnnlab.load_weights(ours, reference.state_dict()).layout == "torchvision"
    ours.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), reference(x)
    assert a["out"].shape == a["aux"].shape == (2, 3, 64, 96)
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a["aux"], b["aux"], rtol=1e-5, atol=1e-4)


def test_deeplabv3_resnet50_parameter_count_is_torchvisions():
    # torchvision's docs (DeepLabV3_ResNet50_Weights): 42,004,074 parameters, with the aux head, 21 classes
    with torch.device("meta"):
        model = cnnlab.create_model("deeplabv3_resnet50", aux_loss=True)
    assert sum(p.numel() for p in model.parameters()) == 42_004_074


def test_deeplabv3_on_a_dilated_resnet18_any_size():
    model = cnnlab.create_model("deeplabv3", backbone="resnet18", num_classes=4, output_stride=16, aux_loss=True)
    assert model.encoder.strides == [16, 16]
    out = model(torch.randn(2, 3, 49, 67))
    assert out["out"].shape == out["aux"].shape == (2, 4, 49, 67)
    out["out"].logsumexp(1).mean().backward()
    assert model.encoder.body.layer4[1].residual.conv2.conv.weight.grad is not None


@pytest.mark.parametrize("backbone, output_stride", [("resnet34", 16), ("resnet18", 8)])
def test_deeplabv3plus_takes_smps_weights(backbone, output_stride):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    reference = smp.DeepLabV3Plus(backbone, encoder_weights=None, classes=3, encoder_output_stride=output_stride)
    randomize_norm_stats(reference).eval()
    ours = cnnlab.create_model("deeplabv3plus", backbone=backbone, num_classes=3, output_stride=output_stride)
    result = cnnlab.load_weights(ours, reference.state_dict())
    assert result.layout == "smp" and result.ok
    ours.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), reference(x)
    assert a.shape == (2, 3, 64, 96)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_deeplabv3plus_any_input_size():
    model = cnnlab.create_model("deeplabv3plus", backbone="resnet18", num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 2, 50, 70)  # smp needs multiples of 16


@pytest.mark.parametrize("name, kwargs, message", [
    ("deeplabv3", {"backbone": "resnet18", "output_stride": 32}, "output_stride must be 8 or 16"),
    ("deeplabv3plus", {"backbone": "resnet18", "output_stride": 32}, "output_stride must be 8 or 16"),
    ("deeplabv3", {"backbone": "vgg11", "output_stride": 16}, "cannot be dilated"),
    ("deeplabv3", {"backbone": "resnet18", "atrous_rates": (6, 12)}, "three positive ints"),
    ("deeplabv3plus", {"backbone": "resnet18", "num_classes": 0}, "counts the background"),
    ("deeplabv3plus", {"backbone": "resnet18", "low_level_stride": 3}, "stage of stride 3"),
    ("deeplabv3plus", {"backbone": "resnet18", "decoder_chanels": 3}, "decoder_chanels"),
])
def test_bad_deeplab_options_say_what_is_expected(name, kwargs, message):
    with pytest.raises(CnnlabError, match=message):
        cnnlab.create_model(name, **kwargs)
