"""Residual blocks: shapes, shortcuts, the bottleneck's 17c² claim, zero-init, attention, pre-activation order."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cnnlab import CnnlabError
from cnnlab.layers import ConvNormAct, SqueezeExcite, zero_init_last_norm
from cnnlab.layers.residual import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck


def conv_weights(block: nn.Module) -> int:
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))


def test_bottleneck_17c2_vs_two_3x3_18c2():
    # SPEC §2 / He et al. 2016, Fig. 5: a 256-d bottleneck with 64-d inside costs
    # 256*64 + 9*64*64 + 64*256 = 17 * 64² weights; two 3x3 convs of 64 maps cost 18 * 64².
    c = 64
    assert conv_weights(Bottleneck(256, 256)) == 17 * c * c
    assert conv_weights(BasicBlock(64, 64)) == 18 * c * c


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck])
def test_identity_vs_projection_shortcut(block):
    out = 64 * block.expansion
    same = block(out, out)
    assert isinstance(same.shortcut, nn.Identity)
    down = block(out, 2 * out, stride=2)
    conv = down.shortcut.conv if isinstance(down.shortcut, ConvNormAct) else down.shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    x = torch.randn(2, out, 8, 8)
    assert same(x).shape == (2, out, 8, 8)
    assert down(x).shape == (2, 2 * out, 4, 4)


def test_bottleneck_width_groups_and_base_width():
    # ResNeXt-50 32x4d, first stage: 32 groups x 4 channels = 128 in the 3x3 conv
    conv2 = Bottleneck(64, 256, groups=32, base_width=4).residual.conv2.conv
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (128, 128, 32)
    # Wide ResNet-50-2: twice ResNet-50's inner width, outer widths kept
    wide = Bottleneck(64, 256, base_width=128)
    assert wide.residual.conv2.conv.out_channels == 128 and wide.residual.conv3.conv.out_channels == 256


def test_basic_block_rejects_groups():
    with pytest.raises(CnnlabError, match="Bottleneck"):
        BasicBlock(64, 64, groups=32)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_zero_init_last_makes_identity(block):
    torch.manual_seed(0)
    b = block(64, 128 * block.expansion, stride=2).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(b(x), b.act(b.shortcut(x)))  # random init: not an identity
        b.zero_init_last()
        torch.testing.assert_close(b(x), F.relu(b.shortcut(x)))
    # inside a model, cnnlab.layers.zero_init_last_norm finds the block's hook
    torch.manual_seed(0)
    model = nn.Sequential(block(64, 64 * block.expansion), block(64 * block.expansion, 64 * block.expansion))
    assert zero_init_last_norm(model) == 2
    assert all(blk.last_norm().weight.abs().sum() == 0 for blk in model)


@pytest.mark.parametrize("block", [PreActBasicBlock, PreActBottleneck])
def test_preact_zero_init_last_gives_shortcut(block):
    torch.manual_seed(0)
    width = 16 * block.expansion
    for b, x in ((block(width, width), torch.randn(2, width, 8, 8)),
                 (block(width, 2 * width, 2), torch.randn(2, width, 8, 8))):
        b.eval()
        b.zero_init_last()
        with torch.no_grad():
            expected = x if isinstance(b.shortcut, nn.Identity) else b.shortcut(b.preact(x))
            torch.testing.assert_close(b(x), expected)


def test_preact_basic_order_matches_paper():
    # He et al. 2016b, Fig. 1b: x + conv(relu(bn(conv(relu(bn(x)))))); the projection reads the pre-activation
    torch.manual_seed(0)
    b = PreActBasicBlock(16, 32, 2).eval()
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 8, 8)
    r = b.residual
    bn1, bn2 = b.preact.norm, r.norm2
    with torch.no_grad():
        pre = F.relu(bn1(x))
        expected = r.conv2(F.relu(bn2(r.conv1(pre)))) + b.shortcut(pre)
        torch.testing.assert_close(b(x), expected)


def test_attn_layer_inserted_before_the_sum():
    se = partial(SqueezeExcite, rd_ratio=1 / 16)
    b = Bottleneck(64, 256, attn_layer=se)
    names = [n for n, _ in b.residual.named_children()]
    assert names == ["conv1", "conv2", "conv3", "attn"]
    assert isinstance(b.residual.attn, SqueezeExcite) and b.residual.attn.fc1.out_channels == 16
    assert not any(isinstance(m, SqueezeExcite) for m in Bottleneck(64, 256).modules())
    assert isinstance(PreActBasicBlock(16, 16, attn_layer=se).residual.attn, SqueezeExcite)


def test_drop_path_and_dropout():
    b = Bottleneck(64, 256, drop_path=0.5)
    assert b.residual.drop_path.p == 0.5
    assert "drop_path" not in dict(Bottleneck(64, 256).residual.named_children())
    wide = PreActBasicBlock(16, 16, drop_rate=0.3)
    names = [n for n, _ in wide.residual.named_children()]
    assert names.index("conv1") < names.index("dropout") < names.index("conv2")  # WRN: dropout between convs
    b.eval()
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(b(x), b(x))  # no randomness at eval


def test_custom_norm_and_act_factories():
    b = BasicBlock(8, 16, 2, norm_layer=partial(nn.GroupNorm, 4), act_layer=nn.SiLU)
    assert isinstance(b.residual.conv1.norm, nn.GroupNorm) and isinstance(b.act, nn.SiLU)
    assert isinstance(b.shortcut.norm, nn.GroupNorm)
    assert b(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)
