"""ResNet, ResNeXt, Wide ResNet-50/101 and SE-ResNe(X)t versus torchvision and timm."""
from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.layers import SqueezeExcite
from cnnlab.layers.residual import BasicBlock, Bottleneck
from cnnlab.models.resnet import ResNet
from tests.oracle import check_converted, count_params, meta_count

torchvision = pytest.importorskip("torchvision")

TORCHVISION_VARIANTS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
TIMM_VARIANTS = ["seresnet50", "seresnext50_32x4d", "seresnet101", "seresnext101_32x4d"]


@pytest.mark.parametrize("name", TORCHVISION_VARIANTS)
def test_param_count_equals_torchvision(name):
    theirs = meta_count(torchvision.models.get_model, name)
    assert meta_count(cnnlab.create_model, name) == theirs


@pytest.mark.parametrize("name", TIMM_VARIANTS)
def test_param_count_equals_timm(name):
    timm = pytest.importorskip("timm")
    assert meta_count(cnnlab.create_model, name) == meta_count(timm.create_model, name)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_same_output_as_torchvision(name):
    torch.manual_seed(0)
    check_converted(name, torchvision.models.get_model(name))


@pytest.mark.parametrize("name", ["seresnet50", "seresnext50_32x4d"])
def test_same_output_as_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    check_converted(name, timm.create_model(name))


def test_dilated_resnet50_matches_torchvision():
    # DeepLab-style backbone: output_stride 8 == torchvision's replace_stride_with_dilation=[False, True, True]
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    check_converted("resnet50", theirs, input_size=32, output_stride=8)
    model = cnnlab.create_model("resnet50", output_stride=8, init="none").eval()
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 8, 8]
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 4, 4]


def test_layout_is_detected():
    tv = torchvision.models.resnet18().state_dict()
    assert cnnlab.load_weights(cnnlab.create_model("resnet18"), tv).layout == "torchvision"
    ours = cnnlab.create_model("resnet18")
    assert cnnlab.load_weights(cnnlab.create_model("resnet18"), ours.state_dict()).layout == "cnnlab"
    # SE keys are timm's, never torchvision's
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        se = timm.create_model("seresnet50").state_dict()
    from cnnlab.models.resnet import from_timm, from_torchvision

    with pytest.raises(KeyError):
        from_torchvision(se)
    assert set(from_timm(se)) == set(cnnlab.create_model("seresnet50").state_dict())


def test_resnet34_table1():
    # SPEC §2 / He et al. 2016, Table 1: ResNet-34 = 3, 4, 6, 3 residual units of 64/128/256/512 maps
    model = cnnlab.create_model("resnet34")
    stages = [model.get_submodule(f"layer{i}") for i in range(1, 5)]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    assert [s[-1].out_channels for s in stages] == [64, 128, 256, 512]
    assert all(isinstance(b, BasicBlock) for s in stages for b in s)


def test_feature_info():
    model = cnnlab.create_model("resnet50")
    assert [(f.module, f.channels, f.stride) for f in model.feature_info] == [
        ("stem", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]


def test_conflicting_override_raises():
    with pytest.raises(CnnlabError, match="groups=4 conflicts.*groups=32"):
        cnnlab.create_model("resnext50_32x4d", groups=4)
    with pytest.raises(CnnlabError, match="base_width"):
        cnnlab.create_model("wide_resnet50_2", base_width=64)
    with pytest.raises(CnnlabError, match="block"):
        cnnlab.create_model("resnet50", block=BasicBlock)
    # the same value is no conflict
    assert meta_count(cnnlab.create_model, "resnext50_32x4d", groups=32) == 25_028_904  # torchvision's count


def test_zero_init_residual_makes_every_block_an_identity():
    torch.manual_seed(0)
    for name in ("resnet18", "seresnet50"):
        model = cnnlab.create_model(name, zero_init_residual=True).eval()
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        inputs: dict[nn.Module, torch.Tensor] = {}
        handles = [b.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0].clone())) for b in blocks]
        outputs: dict[nn.Module, torch.Tensor] = {}
        handles += [b.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out)) for b in blocks]
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
            for b in blocks:
                torch.testing.assert_close(outputs[b], b.act(b.shortcut(inputs[b])))
        for h in handles:
            h.remove()
    # without the option the blocks are not identities (so the check above can fail)
    plain = cnnlab.create_model("resnet18").eval()
    b = plain.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(b(x), b.act(b.shortcut(x)))


def test_attn_layer_inserts_squeeze_excite():
    def se_count(model):
        return sum(isinstance(m, SqueezeExcite) for m in model.modules())

    with torch.device("meta"):
        assert se_count(cnnlab.create_model("resnet50")) == 0
        se50 = cnnlab.create_model("seresnet50")
        assert se_count(se50) == 16  # one per bottleneck: 3 + 4 + 6 + 3
        assert se50.layer4[0].residual.attn.fc1.out_channels == 2048 // 16  # r = 16 (Hu et al. 2018)
        # any ResNet takes an attention layer; SE is not a separate copy of the network
        se18 = cnnlab.create_model("resnet18", attn_layer=partial(SqueezeExcite, rd_ratio=1 / 8))
        assert se_count(se18) == 8 and se18.layer1[0].residual.attn.fc1.out_channels == 8


def test_options():
    model = cnnlab.create_model("resnet18", drop_rate=0.2, drop_path_rate=0.1, num_classes=3, in_channels=1)
    assert model.dropout.p == 0.2
    blocks = [b for s in ("layer1", "layer2", "layer3", "layer4") for b in model.get_submodule(s)]
    assert "drop_path" not in dict(blocks[0].residual.named_children())  # linear rule: 0 at the first block
    assert blocks[-1].residual.drop_path.p == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    gn = cnnlab.create_model("resnet18", norm_layer="groupnorm", act_layer="silu")
    assert isinstance(gn.layer1[0].residual.conv1.norm, nn.GroupNorm) and isinstance(gn.layer1[0].act, nn.SiLU)
    torch.manual_seed(0)
    xavier = cnnlab.create_model("resnet18", init="xavier")
    bound = (6 / (64 * 9 + 64 * 9)) ** 0.5  # Glorot uniform bound of a 64->64 3x3 conv
    assert xavier.layer1[0].residual.conv1.conv.weight.abs().max() <= bound
    with pytest.raises(CnnlabError, match="init"):
        cnnlab.create_model("resnet18", init="orthogonal")
    with pytest.raises(CnnlabError, match="output_stride"):
        cnnlab.create_model("resnet18", output_stride=4)


def test_generic_class_with_custom_table():
    from cnnlab.models.resnet import resnet_stages

    model = ResNet(block=BasicBlock, stages=resnet_stages(1, 1, 1, 1), num_classes=10).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert count_params(model) < count_params(cnnlab.create_model("resnet18", num_classes=10))
    with pytest.raises(CnnlabError, match="4 stages"):
        resnet_stages(2, 2, 2)


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    model = cnnlab.create_model("resnet18", attn_layer=SqueezeExcite, drop_path_rate=0.1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x))


def test_pretrained_path_converts_torchvision_weights(monkeypatch):
    # create_model(weights="torchvision") offline: the download is replaced by a random torchvision model
    from cnnlab.models import weights as weights_mod

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18().eval()
    monkeypatch.setattr(weights_mod, "download_pretrained", lambda info, source: theirs.state_dict())
    ours = cnnlab.create_model("resnet18", weights="torchvision").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    head10 = cnnlab.create_model("resnet18", weights="torchvision", num_classes=10)
    assert head10.fc.out_features == 10
    assert torch.equal(head10.layer4[1].residual.conv2.conv.weight, theirs.layer4[1].conv2.weight)
