"""BatchNorm folding: same outputs as the unfolded model, no BN left after a conv, the BNs that must stay stay.

Oracles: the unfolded model itself (BN statistics and affine terms randomised, else folding the default
init would be close to the identity), the hand-written formula on a single grouped conv, and torch.fx's own
conv-BN fusion (``torch.fx.experimental.optimization.fuse``) on a torchvision ResNet that fx can trace.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx.experimental.optimization
import torchvision
from torch import nn

import cnnlab
from cnnlab import CnnlabError
from cnnlab.compress import find_conv_bn_pairs, fold_bn, probe_input
from cnnlab.compress.fold import BATCH_NORMS


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def assert_close_scaled(folded: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32: |difference| <= rtol x the output's magnitude (a sum of many fp32 products)."""
    scale = reference.abs().max().clamp_min(1e-6)
    assert (folded - reference).abs().max() <= rtol * scale, ((folded - reference).abs().max(), scale)


def bn_count(model: nn.Module) -> int:
    return sum(type(m) in BATCH_NORMS for m in model.modules())


# residual, grouped, depthwise (+ squeeze-excite), concatenating (dense and inception), pre-activation
CASES = {"resnet18": 64, "resnext50_32x4d": 64, "mobilenet_v2": 64, "efficientnet_b0": 64, "densenet121": 32,
         "googlenet": 64, "preact_resnet20": 32}


@pytest.mark.parametrize("name", list(CASES))
def test_folded_classifier_matches_and_keeps_no_bn_after_a_conv(name):
    torch.manual_seed(0)
    model = randomise_bn(cnnlab.create_model(name, num_classes=5))
    x = torch.randn(2, 3, CASES[name], CASES[name])
    folded = fold_bn(model, input_size=(3, CASES[name], CASES[name]))
    with torch.no_grad():
        assert_close_scaled(folded(x), model(x))
    report = folded.bn_fold
    assert report.num_folded > 0
    assert bn_count(folded) == report.num_left == bn_count(model) - report.num_folded
    pairs, _ = find_conv_bn_pairs(folded, x)  # nothing left to fold: no BN reads a conv's output alone
    assert pairs == []
    assert bn_count(model) > bn_count(folded) or report.num_folded == 0  # the original is untouched
    assert not folded.training


def test_counts_follow_the_architecture():
    # ResNet-18: every BN follows a conv (stem, 16 in the blocks, 3 downsample shortcuts)
    assert fold_bn(cnnlab.create_model("resnet18", num_classes=3)).bn_fold.num_folded == 20
    # DenseNet-121: each of the 58 dense layers' first BN reads the concatenation and stays, as do the 3
    # transitions' BNs and the final norm; the stem BN and each layer's second BN (after the 1x1 conv) fold
    report = fold_bn(cnnlab.create_model("densenet121", num_classes=3), input_size=(3, 32, 32)).bn_fold
    assert (report.num_folded, report.num_left) == (1 + 58, 58 + 3 + 1)
    assert all("not a convolution's output" in why for why in report.left.values())


def test_matches_the_formula_on_a_grouped_conv_without_bias():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6, affine=False)))
    folded = fold_bn(model, input_size=(4, 9, 9))
    conv, bn = model[0], model[1]
    scale = (bn.running_var + bn.eps).rsqrt()  # gamma / sqrt(var + eps), gamma = 1 without affine
    torch.testing.assert_close(folded[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded[0].bias, -bn.running_mean * scale)
    assert isinstance(folded[1], nn.Identity)
    assert model[1] is bn and model[0].bias is None  # inplace=False: the original keeps its layers


def test_same_weights_as_torch_fx_fusion():
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=4))
    reference = torch.fx.experimental.optimization.fuse(model)
    folded = fold_bn(model, input_size=(3, 64, 64))
    assert folded.bn_fold.num_folded == 20 and bn_count(folded) == 0
    ours = {k: v for k, v in folded.state_dict().items()}
    theirs = reference.state_dict()
    for key in ("conv1.weight", "conv1.bias", "layer2.0.downsample.0.weight", "layer2.0.downsample.0.bias"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


class TwoReaders(nn.Module):
    """A conv whose output feeds a BN and a shortcut: the BN must stay (folding would change the shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


def test_bn_beside_a_shortcut_is_left_and_the_next_pair_folds():
    model = randomise_bn(TwoReaders())
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(model, input_size=x)
    assert folded.bn_fold.folded == [("conv2", "bn2")]
    assert "also read elsewhere" in folded.bn_fold.left["bn"]
    with torch.no_grad():
        assert_close_scaled(folded(x), model(x))


def test_bn_without_running_statistics_is_left():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded = fold_bn(model, input_size=(3, 8, 8))
    assert folded.bn_fold.num_folded == 0 and "running statistics" in folded.bn_fold.left["1"]


def test_detection_backbone_folds():
    names = cnnlab.list_models(task="detection")
    if "faster_rcnn" not in names:
        pytest.skip("no faster_rcnn registered")
    torch.manual_seed(0)
    model = randomise_bn(cnnlab.create_model("faster_rcnn", num_classes=3, backbone="resnet18", min_size=64,
                                             max_size=96))
    folded = fold_bn(model)  # a registered detector: probed with a list of images
    assert folded.bn_fold.num_folded == 20 and bn_count(folded) == 0
    images = probe_input(model, (3, 64, 80), batch=2)
    with torch.no_grad():
        reference, ours = model(images), folded(images)
        for a, b in zip(reference, ours):  # same detections: boxes to fp32 accuracy on a ~100 px scale
            assert torch.equal(a["labels"], b["labels"])
            assert_close_scaled(b["boxes"], a["boxes"], rtol=1e-4)
            assert_close_scaled(b["scores"], a["scores"], rtol=1e-4)


def test_segmentation_model_folds():
    if "pspnet" not in cnnlab.list_models(task="segmentation"):
        pytest.skip("no pspnet registered")
    torch.manual_seed(0)
    model = randomise_bn(cnnlab.create_model("pspnet", num_classes=3, backbone="resnet18"))
    x = torch.randn(1, 3, 64, 64)
    folded = fold_bn(model, input_size=(3, 64, 64))
    assert folded.bn_fold.num_folded > 0
    with torch.no_grad():
        reference, ours = model(x), folded(x)
    if isinstance(reference, dict):  # with its auxiliary head
        for key in reference:
            assert_close_scaled(ours[key], reference[key])
    else:
        assert_close_scaled(ours, reference)


def test_bad_input():
    with pytest.raises(CnnlabError, match="nn.Module"):
        fold_bn("resnet18")
    with pytest.raises(CnnlabError, match="input_size"):  # not registered: its input cannot be guessed
        fold_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    with pytest.raises(CnnlabError, match=r"\(C, H, W\)"):
        fold_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), input_size=(3, 0, 8))
    with pytest.raises(CnnlabError, match="could not run"):  # a probe input the model refuses
        fold_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), input_size=(4, 8, 8))
