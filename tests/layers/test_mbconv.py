"""The depthwise separable block and MBConv: cost, residual rule, SE width, stochastic depth, oracle."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from cnnlab.layers import SqueezeExcite
from cnnlab.layers.mbconv import DepthwiseSeparableBlock, MBConv
from tests.models._helpers import macs
from tests.oracle import randomize_norm_stats


@pytest.mark.parametrize("in_channels,out_channels", [(32, 64), (512, 512)])
def test_separable_costs_one_over_n_plus_one_over_k2(in_channels, out_channels):
    # Howard et al. 2017, eq. 5: separable / standard = 1/N + 1/Dk^2 (N output channels, Dk = 3).
    x = torch.randn(1, in_channels, 14, 14)
    separable = macs(DepthwiseSeparableBlock(in_channels, out_channels).eval(), x)
    standard = macs(nn.Conv2d(in_channels, out_channels, 3, padding=1), x)
    assert separable / standard == pytest.approx(1 / out_channels + 1 / 9, rel=1e-12)
    if out_channels >= 128:  # "8 to 9 times less computation" (Sec. 3.1) holds once N is in the hundreds
        assert 8 <= standard / separable <= 9


def test_separable_block_shape_and_children():
    block = DepthwiseSeparableBlock(16, 32, stride=2)
    assert block(torch.randn(2, 16, 20, 20)).shape == (2, 32, 10, 10)
    assert block.dw.conv.groups == 16 and block.dw.conv.stride == (2, 2) and block.pw.conv.kernel_size == (1, 1)
    assert isinstance(block.pw.act, nn.ReLU)


@pytest.mark.parametrize("stride,in_channels,out_channels,residual", [(1, 16, 16, True), (2, 16, 16, False),
                                                                      (1, 16, 24, False)])
def test_residual_only_when_shapes_match(stride, in_channels, out_channels, residual):
    block = MBConv(in_channels, out_channels, stride=stride).eval()
    assert block.has_residual is residual
    block.zero_init_last()  # the branch now outputs zeros: out = x exactly when there is a residual
    x = torch.randn(2, in_channels, 8, 8)
    out = block(x)
    assert out.shape == (2, out_channels, 8 // stride, 8 // stride)
    if residual:
        assert torch.equal(out, x)
    else:  # nothing to start as the identity: the branch keeps its weights
        assert block.project.norm.weight.abs().min() > 0


def test_expand_ratio_one_has_no_expansion_conv():
    block = MBConv(32, 16, expand_ratio=1)
    assert not hasattr(block, "expand") and block.dw.conv.in_channels == 32
    # linear bottleneck: the projection has no activation
    assert not hasattr(block.project, "act")
    assert hasattr(MBConv(16, 16, expand_ratio=6), "expand")


def test_se_bottleneck_follows_block_input():
    # EfficientNet: SE squeezes the 6x-expanded map to in_channels * 0.25 (= 40 // 4), not hidden // 4
    block = MBConv(40, 80, expand_ratio=6, attn_layer=SqueezeExcite, attn_ratio=0.25)
    assert block.attn.fc1.in_channels == 240 and block.attn.fc1.out_channels == 10


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    block = MBConv(8, 8, drop_path=0.5)
    randomize_norm_stats(block)
    x = torch.randn(256, 8, 4, 4)
    block.train()
    out = block(x)
    dropped = (out == x).flatten(1).all(1)  # a dropped sample is exactly the identity
    assert 0.35 < dropped.float().mean().item() < 0.65
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), block(x)) and not (block(x) == x).flatten(1).all(1).any()
    assert isinstance(MBConv(8, 16, drop_path=0.5).drop_path, nn.Identity)  # no residual, nothing to drop


def test_mbconv_matches_torchvision_efficientnet_block():
    from torchvision.models.efficientnet import MBConv as TVMBConv
    from torchvision.models.efficientnet import MBConvConfig

    torch.manual_seed(0)
    theirs = TVMBConv(MBConvConfig(6, 5, 1, 40, 40, 1), 0.0, nn.BatchNorm2d).eval()
    randomize_norm_stats(theirs)
    se = partial(SqueezeExcite, act_layer=nn.SiLU)
    ours = MBConv(40, 40, 5, expand_ratio=6, act_layer=nn.SiLU, attn_layer=se).eval()
    src = list(theirs.state_dict().values())
    dst = ours.state_dict()
    assert [tuple(v.shape) for v in src] == [tuple(v.shape) for v in dst.values()]  # same layers, same order
    ours.load_state_dict(dict(zip(dst, src)))
    x = torch.randn(2, 40, 9, 9)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
