"""ShuffleNet units: the channel shuffle permutation, v1 and v2 units' wiring and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cnnlab import CnnlabError
from cnnlab.layers.shuffle import ChannelShuffle, ShuffleUnitV1, ShuffleUnitV2
from tests.oracle import randomize_norm_stats


@pytest.mark.parametrize("groups,channels", [(2, 6), (3, 12), (4, 8)])
def test_channel_shuffle_permutation(groups, channels):
    x = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1)
    out = ChannelShuffle(groups)(x).flatten().long().tolist()
    n = channels // groups
    # channel j of group i (index i*n + j) moves to position j*g + i: each output group takes one from every input group
    expected = [0] * channels
    for i in range(groups):
        for j in range(n):
            expected[j * groups + i] = i * n + j
    assert out == expected
    # shuffling by n undoes shuffling by g
    assert torch.equal(ChannelShuffle(n)(ChannelShuffle(groups)(x)), x)


def test_v1_stride1_unit_is_residual():
    torch.manual_seed(0)
    unit = randomize_norm_stats(ShuffleUnitV1(48, 48, stride=1, groups=3)).eval()
    assert unit.branch.conv1.conv.groups == 3 and unit.branch.conv3.conv.groups == 3
    assert unit.branch.conv2.conv.groups == 12  # depthwise over the 48 // 4 bottleneck maps
    x = torch.randn(2, 48, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), F.relu(unit.branch(x) + x))
        unit.branch.conv3.norm.weight.zero_()
        unit.branch.conv3.norm.bias.zero_()
        torch.testing.assert_close(unit(x), F.relu(x))  # a silent branch leaves relu(x)


def test_v1_stride2_unit_concatenates_pooled_shortcut():
    torch.manual_seed(0)
    unit = randomize_norm_stats(ShuffleUnitV1(24, 240, stride=2, groups=3, first_grouped=False)).eval()
    assert unit.branch.conv1.conv.groups == 1 and isinstance(unit.branch.shuffle, nn.Identity)
    assert unit.branch.conv3.conv.out_channels == 240 - 24
    x = torch.rand(2, 24, 16, 16)  # non-negative, like the max-pooled ReLU output it follows
    with torch.no_grad():
        out = unit(x)
    assert out.shape == (2, 240, 8, 8)
    torch.testing.assert_close(out[:, :24], F.avg_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("args", [
    dict(in_channels=48, out_channels=96, stride=1),       # stride 1 must keep the width
    dict(in_channels=48, out_channels=100, stride=2),      # bottleneck 25 is not a multiple of 3
    dict(in_channels=50, out_channels=96, stride=2),      # grouped conv1 needs in_channels % 3 == 0
    dict(in_channels=48, out_channels=48, stride=3),
])
def test_v1_bad_channels_raise(args):
    with pytest.raises(CnnlabError):
        ShuffleUnitV1(groups=3, **args)


def test_v2_stride1_keeps_half_the_channels():
    torch.manual_seed(0)
    unit = randomize_norm_stats(ShuffleUnitV2(32, 32, stride=1)).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out = unit(x)
        # channel split: the first half passes untouched and, after the 2-group shuffle, sits on the even channels
        assert torch.equal(out[:, 0::2], x[:, :16])
        torch.testing.assert_close(out[:, 1::2], unit.branch(x[:, 16:]))


def test_v2_stride2_uses_both_branches():
    unit = ShuffleUnitV2(24, 116, stride=2).eval()
    assert unit.shortcut.conv1.conv.groups == 24 and unit.branch.conv1.conv.in_channels == 24
    x = torch.randn(1, 24, 16, 16)
    with torch.no_grad():
        out = unit(x)
        assert out.shape == (1, 116, 8, 8)
        assert torch.equal(out[:, 0::2], unit.shortcut(x)) and torch.equal(out[:, 1::2], unit.branch(x))


def test_v2_bad_channels_raise():
    with pytest.raises(CnnlabError, match="even"):
        ShuffleUnitV2(24, 115, stride=2)
    with pytest.raises(CnnlabError, match="equal to in_channels"):
        ShuffleUnitV2(24, 48, stride=1)
