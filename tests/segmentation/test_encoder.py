"""The segmentation encoder: feature_info stages of any classifier, dilated to output stride 8/16 (basic-block
ResNets too, vision#4801), smp's encoder keys and its uniform dilation, bad input."""
from __future__ import annotations

import pytest
import torch

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.segmentation.encoder import build_encoder, encoder_from_smp
from tests.oracle import randomize_norm_stats


@pytest.mark.parametrize("output_stride, strides", [(32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]),
                                                    (8, [2, 4, 8, 8, 8])])
def test_resnet18_dilates_to_the_output_stride(output_stride, strides):
    encoder = build_encoder("resnet18", output_stride=output_stride)
    assert encoder.strides == strides and encoder.channels == [64, 64, 128, 256, 512]
    maps = encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // s, 96 // s) for s in strides]
    assert all(p.requires_grad for p in encoder.parameters())  # every stage trains
    assert isinstance(encoder.body.stem.norm, torch.nn.BatchNorm2d)  # batch norm kept trainable, not frozen


def test_encoder_returns_the_classifiers_own_maps():
    torch.manual_seed(0)
    classifier = randomize_norm_stats(cnnlab.create_model("resnet18", output_stride=16)).eval()
    encoder = build_encoder("resnet18", output_stride=16, stages=[1, 4])
    cnnlab.load_weights(encoder.body, classifier.state_dict(), strict=False)
    encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        low, deep = encoder(x)
        expected = classifier.forward_features(x)
        expected_low = classifier.layer1(classifier.maxpool(classifier.stem(x)))
    assert encoder.strides == [4, 16]
    torch.testing.assert_close(deep, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low, expected_low, rtol=1e-5, atol=1e-5)
    assert "fc.weight" not in encoder.state_dict() and "body.fc.weight" not in encoder.state_dict()


def test_uniform_dilation_and_smp_keys_match_smps_encoder():
    # smp dilates every conv of a stage at stride/output_stride (make_dilated); its keys are torchvision's
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(0)
    reference = randomize_norm_stats(get_encoder("resnet18", weights=None, output_stride=8)).eval()
    encoder = build_encoder("resnet18", output_stride=8, stages=[0, 1, 2, 3, 4], uniform_dilation=True)
    state = encoder_from_smp({f"encoder.{k}": v for k, v in reference.state_dict().items()})
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()})
    encoder.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = encoder(x), reference(x)[1:]  # smp's first "feature" is the input itself
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert encoder.body.layer4[0].residual.conv1.conv.dilation == (4, 4)  # torchvision's would keep 2 here


def test_encoder_from_smp_refuses_a_foreign_key():
    with pytest.raises(KeyError, match="blocks.0.weight"):
        encoder_from_smp({"encoder.blocks.0.weight": torch.zeros(1)})


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "vgg16", "output_stride": 8}, "cannot be dilated"),
    ({"name": "resnet18", "output_stride": 4}, "output_stride must be one of"),
    ({"name": "resnet18", "stages": [3, 1]}, "increasing indices"),
    ({"name": "resnet18", "stages": [7]}, "increasing indices in 0..4"),
    ({"name": "unet"}, "segmentation model"),
])
def test_bad_encoder_requests_say_what_is_expected(kwargs, message):
    with pytest.raises(CnnlabError, match=message):
        build_encoder(**kwargs)


def test_encoder_exports_with_dynamic_sizes_and_deep_copies():
    # the taps are hooks registered once (no hooks added while tracing): torch.export traces any height/width
    # (ONNX export with dynamic sizes, smp#1015); a deep copy (an EMA's) taps its own stages
    import copy

    encoder = build_encoder("resnet18", output_stride=16, stages=[1, 4]).eval()
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.export.export(encoder, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: dynamic, 3: dynamic},))
    x = torch.randn(1, 3, 48, 80)
    twin = copy.deepcopy(encoder)
    with torch.no_grad():
        expected = encoder(x)
        for got in (program.module()(x), twin(x)):
            assert [tuple(g.shape) for g in got] == [(1, 64, 12, 20), (1, 512, 3, 5)]
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
