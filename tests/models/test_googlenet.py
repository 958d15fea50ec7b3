"""GoogLeNet and SE-Inception: counts vs torchvision and the paper, oracle outputs, auxiliary classifiers."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.layers import SqueezeExcite
from cnnlab.models.alexnet import alexnet
from cnnlab.models.googlenet import GoogLeNetOutputs, googlenet, se_googlenet
from tests.models._helpers import assert_smallest_input
from tests.oracle import check_converted, meta_count

tv_googlenet = partial(torchvision.models.googlenet, weights=None, init_weights=True)
# for oracle outputs the init does not matter; PyTorch's default is much faster than trunc_normal_
tv_googlenet_fast = partial(torchvision.models.googlenet, weights=None, init_weights=False)


@pytest.mark.parametrize("aux_logits", [False, True])
def test_parameter_count_equals_torchvision(aux_logits):
    ours = meta_count(googlenet, aux_logits=aux_logits)
    assert ours == meta_count(tv_googlenet, aux_logits=aux_logits)
    assert ours == (13_004_888 if aux_logits else 6_624_904)  # torchvision's weights metadata: 6,624,904


def test_paper_parameter_count():
    # Szegedy et al. 2014 Table 1: the params column sums to 6,797.7K with K = 1024 (its "linear" row,
    # 1024*1000 weights, reads 1000K), counting weights only. The paper's convs (5x5 in branch 3, no
    # BN), weights only, land within 1% of it; with biases: 6,998,552, "~6.8M".
    with torch.device("meta"):
        model = googlenet(large_kernel_size=5, norm_layer=None)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert abs(weights / 1024 - 6797.7) / 6797.7 < 0.01
    assert meta_count(googlenet, large_kernel_size=5, norm_layer=None) == 6_998_552


def test_about_ten_times_fewer_parameters_than_alexnet():
    # the notes: GoogLeNet ~6.8M parameters, about 10x fewer than AlexNet's ~60M
    ratio = meta_count(alexnet, groups=2) / meta_count(googlenet)
    assert 8.5 < ratio < 11.5, ratio  # 60,965,224 / 6,624,904 = 9.2


def test_same_output_as_torchvision():
    torch.manual_seed(0)
    assert check_converted("googlenet", tv_googlenet_fast(aux_logits=True), input_size=64, aux_logits=True) <= 1e-4


def test_transform_input_matches_torchvision():
    torch.manual_seed(0)
    reference = tv_googlenet_fast(aux_logits=False, transform_input=True)
    assert check_converted("googlenet", reference, input_size=64, transform_input=True) <= 1e-4


def test_transform_input_needs_rgb():
    with pytest.raises(CnnlabError, match="in_channels=3"):
        cnnlab.create_model("googlenet", transform_input=True, in_channels=1)


def test_aux_logits_in_training_only():
    torch.manual_seed(0)
    model = cnnlab.create_model("googlenet", aux_logits=True, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model.train()(x)
    assert isinstance(out, GoogLeNetOutputs) and isinstance(out, tuple)
    assert out.logits.shape == out.aux1.shape == out.aux2.shape == (2, 5)
    # the paper's training loss: main + 0.3 * each auxiliary loss; every parameter gets a gradient
    y = torch.tensor([0, 1])
    f = nn.functional.cross_entropy
    (f(out.logits, y) + 0.3 * f(out.aux1, y) + 0.3 * f(out.aux2, y)).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)  # eval: plain logits
    model.reset_classifier(3)
    assert [t.shape for t in model.train()(x)] == [(2, 3)] * 3
    with torch.device("meta"):  # aux_logits=False: a tensor, even in training mode
        assert isinstance(cnnlab.create_model("googlenet").train()(torch.empty(2, 3, 32, 32)), torch.Tensor)


def test_aux_taps_the_right_modules():
    model = cnnlab.create_model("googlenet", aux_logits=True)
    assert model.aux1.conv.conv.in_channels == 512 and model.aux2.conv.conv.in_channels == 528  # 4a, 4d
    with pytest.raises(CnnlabError, match="aux_after"):
        cnnlab.create_model("googlenet", aux_logits=True, aux_after=("inception9z", "inception4d"))


def test_feature_strides_at_224():
    with torch.device("meta"):
        model = cnnlab.create_model("googlenet")
        maps = model.forward_intermediates(torch.empty(1, 3, 224, 224))
    assert [(f.stride, m.shape[1], m.shape[-1]) for f, m in zip(model.feature_info, maps)] == [
        (2, 64, 112), (4, 192, 56), (8, 480, 28), (16, 832, 14), (32, 1024, 7),
    ]


def test_min_input_size():
    assert_smallest_input("googlenet", 15)  # torchvision's min_size is 15 too


def test_se_inception():
    # Hu et al. 2018 Fig. 2: SE on each Inception module's output. Each SE adds two 1x1 convs C -> C/16 -> C.
    model = cnnlab.create_model("se_googlenet", num_classes=4)
    widths = [m.attn.fc2.out_channels for m in model.modules() if isinstance(getattr(m, "attn", None), SqueezeExcite)]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    extra = sum(c * round(c / 16) + round(c / 16) + round(c / 16) * c + c for c in widths)
    assert meta_count(se_googlenet) - meta_count(googlenet) == extra
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert cnnlab.model_info("se_googlenet").pretrained == {}


def test_pretrained_file_with_aux_weights_fits_a_model_without_aux():
    # torchvision's pretrained googlenet checkpoint carries aux1/aux2 (its model deletes them after loading)
    reference = tv_googlenet_fast(aux_logits=True)
    model = cnnlab.create_model("googlenet")
    converted = model.filter_state_dict(cnnlab.model_info("googlenet").converter("torchvision")(reference.state_dict()))
    assert not any(k.startswith("aux") for k in converted)
    assert cnnlab.load_weights(model, converted).ok
    assert torch.equal(model.fc.weight, reference.fc.weight)
